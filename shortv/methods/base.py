"""The interface every method implements, and the vanilla model.

A method answers the decoder's questions at three hook points (`Hook`, docs/design.md §9):

- `Hook.IMAGE`, before the language model, on one image's visual tokens (`reduce_image`:
  select or merge them, reading the vision tower's attention and keys at the select layer);
- `Hook.TOKENS`, at layer boundaries, per sequence (`drops_at` / `keep`: which tokens
  survive, reading what an earlier layer was asked to `capture`: attention from chosen
  query rows, keys; the layer's input hidden states are always at hand);
- `Hook.LAYERS`, inside a layer (`frozen_type`: the token type whose updates the layer skips).

A method answers from its own parameters, so adding one touches its module and the
registry in `shortv.methods`, not the decoder. The per-layer answers become the method's
plan (`methods.plan`), which the decoder runs and the FLOPs count reads. `Compose` runs
a layer-wise method with token-wise ones.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from ..token_types import TokenType


class Hook(StrEnum):
    """The hook points where a method answers the model's questions (module docstring)."""

    IMAGE = "image"  # reduces_images, reduce_image, image_tokens, keeps_image
    TOKENS = "tokens"  # drops_at, capture, keep
    LAYERS = "layers"  # frozen_type


class Queries(StrEnum):
    """Query rows whose attention a layer can report."""

    LAST = "last"  # each sequence's last position (at prefill: the last prompt token)
    TEXT = "text"  # every text token


@dataclass(frozen=True)
class Capture:
    """What a layer must report for a later drop: the attention probabilities of some query
    rows (mean over heads), and/or its rotated keys. Only what is asked for is computed.

    before_drop: asked of a layer that also drops (`drops_at`), the layer's own attention
    on its input, before the drop, for that very drop (PDrop ranks so); otherwise the
    layer reports after it ran, for a later drop."""

    queries: Queries | None = None
    keys: bool = False
    before_drop: bool = False


@dataclass
class LayerView:
    """What `Method.keep` sees before layer `layer`, for the B sequences of one pass.

    types [B, T] and hidden [B, T, D] (the layer's input) are always given; `norm` is the
    decoder's final RMSNorm. From the last layer that captured (since the previous drop):
    scores [B, Q, T] (attention of the query rows at query_positions [B, Q] over this pass's
    tokens; rows where query_real is False are filler, all zero) and keys
    [B, T, kv_heads, head_dim] (after RoPE).

    The pass's own input, before any drop: `inputs` [B, T0, D] (every token's input to the
    first layer: what SparseVLM rates with) and `input_types` [B, T0]; `origin` [B, T] is
    the column there of each token at hand (-1 for a token a method inserted)."""

    layer: int
    types: Tensor
    hidden: Tensor
    norm: Callable[[Tensor], Tensor]
    scores: Tensor | None = None
    query_positions: Tensor | None = None
    query_real: Tensor | None = None
    keys: Tensor | None = None
    inputs: Tensor | None = None
    input_types: Tensor | None = None
    origin: Tensor | None = None
    # A method's own notes between its `keep` and `merge` on this view (what both read).
    memo: dict[str, Tensor] = field(default_factory=dict)

    def visual(self) -> Tensor:
        """[B, T] True at visual tokens."""
        return self.types == int(TokenType.VISUAL)

    def first_types(self) -> Tensor:
        """[B, T0] the token types of the pass's input (the tokens at hand if not given)."""
        return self.types if self.input_types is None else self.input_types

    def origins(self) -> Tensor:
        """[B, T] each token's column in `first_types()` (its own position if not given)."""
        if self.origin is not None:
            return self.origin
        b, t = self.types.shape
        return torch.arange(t, device=self.types.device).expand(b, t)

    def sequence_indices(self) -> Tensor:
        """[B, T] each token's index in its own sequence, padding not counted: the position
        a batch of one gives it (what the authors' single-sequence code indexes by)."""
        first = self.first_types()
        index = (first != int(TokenType.PAD)).long().cumsum(dim=1) - 1
        return index.gather(1, self.origins().clamp(min=0))

    def require_scores(self, who: str) -> Tensor:
        if self.scores is None:
            raise RuntimeError(f"{who} needs the attention scores it captures before layer {self.layer}")
        return self.scores


@dataclass
class ImageView:
    """One image's crops at the vision tower's select layer, for `Method.reduce_image`.

    features [C, N, width]: the patch tokens LLaVA reads (no class token); cls_attention
    [C, heads, N]: the class token's attention over the patches in the layer that produced
    them; keys [C, heads, N, head_dim]: that layer's keys of the patches; cls_features
    [C, width]: the class token's hidden state there (VisionZip keeps it). tile_grid
    (rows, cols): given when the model merges an anyres image's tiles into one feature map
    (LLaVA-NeXT's spatial_unpad): crop 0 is the base image, crops 1.. the rows × cols tiles
    in raster order; None otherwise."""

    features: Tensor
    cls_attention: Tensor
    keys: Tensor
    cls_features: Tensor | None = None
    tile_grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class Method:
    """Base class: the vanilla answer to every hook (see the module docstring)."""

    name = "method"
    # The hook points this method answers at; `Compose` combines methods with disjoint hooks.
    hooks: ClassVar[frozenset[Hook]] = frozenset()

    def frozen_type(self, layer: int) -> TokenType | None:
        """The token type whose updates `layer` skips, if any."""
        return None

    def drops_at(self, layer: int) -> bool:
        """Whether tokens may be dropped before `layer`."""
        return False

    def capture(self, layer: int) -> Capture | None:
        """What `layer` must report for a later `keep`, if anything."""
        return None

    def capture_before_drop(self, layer: int) -> Capture | None:
        """The capture `layer` computes on its input for its own drop (`before_drop`)."""
        capture = self.capture(layer)
        return capture if capture is not None and capture.before_drop else None

    def capture_after(self, layer: int) -> Capture | None:
        """The capture `layer` reports after it ran, for a later drop."""
        capture = self.capture(layer)
        return capture if capture is not None and not capture.before_drop else None

    def keep(self, view: LayerView) -> Tensor:
        """Which tokens [B, T] survive the drop before `view.layer`."""
        return torch.ones_like(view.types, dtype=torch.bool)

    def merge(self, view: LayerView, keep: Tensor) -> tuple[Tensor, Tensor] | None:
        """New visual tokens made from the dropped ones (`keep` [B, T] from `keep`), placed
        after each sequence's last kept visual token: (hidden [B, M, D], real [B, M], False
        for filler), or None (the default: a drop only drops). SparseVLM recycles so."""
        return None

    @property
    def compacts_positions(self) -> bool:
        """Whether a drop renumbers the surviving tokens' RoPE positions contiguously (as
        PDrop's and SparseVLM's code do) instead of keeping their original ones."""
        return False

    @property
    def reduces_images(self) -> bool:
        """Whether `reduce_image` changes images (the tower then reports its attention)."""
        return False

    def reduce_image(self, image: ImageView) -> Tensor:
        """One image's visual tokens before the projector: [C, N', width]."""
        return image.features

    def image_tokens(self, n_visual: int) -> int:
        """How many visual tokens an image of `n_visual` has after `reduce_image` (what
        the analytic FLOPs count)."""
        return n_visual

    def keeps_image(self, n_patches: int) -> bool:
        """Whether `reduce_image` keeps every one of an image's `n_patches` patches (all
        crops together) as they are: the image then reaches the language model exactly as
        vanilla's (for anyres, with its unpadding and row-end tokens)."""
        return not self.reduces_images

    def validate(self, num_layers: int) -> None:
        """Raise ConfigError if this method does not fit a decoder of `num_layers`."""

    def for_layers(self, num_layers: int) -> Method:
        """This method for a decoder of `num_layers`: defaults that depend on the depth
        filled in (VTW's k, PDrop's and SparseVLM's layers), then validated, so that the
        fitted method's fields say what it does. The decoder only runs fitted methods."""
        self.validate(num_layers)
        return self

    def describe(self) -> str:
        """A short human-readable name with the parameters, e.g. "fastv(k=2, r=0.5)"."""
        return self.name


@dataclass(frozen=True)
class Vanilla(Method):
    """Every token computed in every layer: the original model."""

    name = "vanilla"


VANILLA = Vanilla()


def layer_ids(layers: Iterable[object]) -> list[int]:
    """Layer ids as Python ints (numpy / torch integers too); ConfigError otherwise."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ConfigError(f"layer ids must be a list of integers, got {layers!r}")
    ids = []
    for layer in layers:
        if isinstance(layer, bool):
            raise ConfigError(f"layer id {layer!r} is not an integer")
        try:
            ids.append(operator.index(layer))  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"layer id {layer!r} is not an integer") from None
    return ids


def check_layer_ids(layers: Iterable[object], num_layers: int) -> None:
    """Raise ConfigError unless `layers` are distinct integers in [0, num_layers)."""
    seen = set()
    for layer in layer_ids(layers):
        if not 0 <= layer < num_layers:
            raise ConfigError(f"layer id {layer} is out of range; the model has layers 0..{num_layers - 1}")
        if layer in seen:
            raise ConfigError(f"layer id {layer} is listed twice")
        seen.add(layer)


def depth_scaled(reference: tuple[int, ...], num_layers: int, reference_depth: int = 32) -> tuple[int, ...]:
    """Layer ids at the same fractions of a `num_layers` decoder as `reference` is of a
    `reference_depth` one: l · num_layers / reference_depth rounded half up (exact in
    integers), so a 32-layer decoder gets `reference` itself. The result may repeat ids
    when the decoder is too shallow; callers check it."""
    return tuple((2 * layer * num_layers + reference_depth) // (2 * reference_depth) for layer in reference)


def check_int(value: object, what: str, *, minimum: int = 1, allowed: str = "") -> None:
    """Raise ConfigError unless `value` is an int (not a bool) >= `minimum`; the message
    names `what` and what is allowed (`allowed`, default "an integer >= minimum")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what}={value!r} is not allowed; use {allowed or f'an integer >= {minimum}'}")


POSITIONS = ("compact", "original")


def check_positions(value: object, who: str) -> None:
    """Raise ConfigError unless `value` names a position rule of a dropping method."""
    if value not in POSITIONS:
        raise ConfigError(f"{who} positions={value!r} is not allowed; use 'compact' (renumber the kept "
                          "tokens, as the authors' code does) or 'original' (keep their positions)")


def check_increasing_layers(layers: object, what: str, *, minimum: int) -> tuple[int, ...]:
    """`layers` as a tuple of strictly increasing int ids >= `minimum`; ConfigError (naming
    `what`) for anything else: a string, an empty list, repeats, a wrong order."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ConfigError(f"{what}={layers!r} must be a tuple of layer ids, e.g. (8, 16, 24)")
    ids = tuple(layer_ids(layers))
    if not ids:
        raise ConfigError(f"{what}=() names no layer; give at least one layer id")
    if list(ids) != sorted(set(ids)) or ids[0] < minimum:
        raise ConfigError(f"{what}={ids} is not allowed; use strictly increasing layer ids >= {minimum}")
    return ids


def parse_layer_list(text: str) -> list[int]:
    """"31,29,30" → [31, 29, 30] (spaces allowed); ConfigError for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(p.lstrip("-").isdigit() for p in parts):
        raise ConfigError(f"{text!r} is not a comma-separated list of layer ids (e.g. 31,29,30)")
    return [int(p) for p in parts]
