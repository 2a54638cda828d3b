"""Inference methods: how a decoder treats visual tokens layer by layer.

All four share the token-type machinery of the decoder:
- `Vanilla()`: every token computed in every layer.
- `ShortV(layers)`: in the named layers visual tokens are *frozen* (DESIGN §6): their
  hidden states pass through, they are neither queries nor MLP inputs, but their keys and
  values are still computed and attended.
- `FastV(k, r)`: at layer k keep the (1 - r) fraction of each sequence's visual tokens that
  the last token attended to most in layer k - 1 (mean over heads); drop the rest for
  layers k.. (hidden states and KV cache). Kept tokens keep their RoPE positions. In
  generation the choice is made once, at prefill, by the last prompt token; recomputing
  a longer sequence from scratch would re-rank with its own last token.
- `VTW(k)`: drop all visual tokens from layer k on.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError
from .token_types import TokenType


@dataclass(frozen=True)
class Method:
    """Base class; the decoder asks these four questions at every layer."""

    name = "method"

    def frozen_type(self, layer: int) -> TokenType | None:
        """The token type whose updates `layer` skips, if any."""
        return None

    def drops_at(self, layer: int) -> bool:
        """Whether tokens are dropped before `layer`."""
        return False

    def needs_scores_at(self, layer: int) -> bool:
        """Whether `layer` must report the last query's attention over its keys."""
        return False

    def keep(self, types: Tensor, scores: Tensor | None) -> Tensor:
        """Which tokens [B, T] survive a drop (scores: [B, T] or None)."""
        return torch.ones_like(types, dtype=torch.bool)

    def validate(self, num_layers: int) -> None:
        """Raise ConfigError if this method does not fit a decoder of `num_layers`."""

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Vanilla(Method):
    name = "vanilla"


@dataclass(frozen=True)
class ShortV(Method):
    """Freeze visual tokens in `layers` (sorted, unique layer ids)."""

    layers: tuple[int, ...] = ()
    name = "shortv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted(_layer_ids(self.layers))))

    def frozen_type(self, layer: int) -> TokenType | None:
        return TokenType.VISUAL if layer in self.layers else None

    def validate(self, num_layers: int) -> None:
        check_layer_ids(self.layers, num_layers)

    def describe(self) -> str:
        return f"shortv(n_frozen={len(self.layers)}, layers={list(self.layers)})"


@dataclass(frozen=True)
class FastV(Method):
    k: int = 2
    r: float = 0.5
    name = "fastv"

    def drops_at(self, layer: int) -> bool:
        return layer == self.k

    def needs_scores_at(self, layer: int) -> bool:
        return layer == self.k - 1

    def keep(self, types: Tensor, scores: Tensor | None) -> Tensor:
        if scores is None:
            raise RuntimeError("FastV needs the attention scores of layer k - 1")
        visual = types == TokenType.VISUAL
        n_visual = visual.sum(dim=1)
        n_keep = fastv_kept(n_visual, self.r)
        # Rank visual tokens by score (non-visual ones last) and keep each row's top n_keep.
        ranked = scores.float().masked_fill(~visual, float("-inf"))
        order = ranked.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        return ~visual | (rank < n_keep[:, None])

    def validate(self, num_layers: int) -> None:
        if not 1 <= self.k:
            raise ConfigError(f"FastV k={self.k} must be >= 1 (it ranks with layer k - 1)")
        if self.k >= num_layers:
            raise ConfigError(f"FastV k={self.k} must be < the model's {num_layers} layers")
        if not 0.0 <= self.r <= 1.0:
            raise ConfigError(f"FastV r={self.r} must be a fraction in [0, 1]")

    def describe(self) -> str:
        return f"fastv(k={self.k}, r={self.r})"


@dataclass(frozen=True)
class VTW(Method):
    k: int = 16
    name = "vtw"

    def drops_at(self, layer: int) -> bool:
        return layer == self.k

    def keep(self, types: Tensor, scores: Tensor | None) -> Tensor:
        return types != TokenType.VISUAL

    def validate(self, num_layers: int) -> None:
        if not 0 <= self.k < num_layers:
            raise ConfigError(f"VTW k={self.k} must be in [0, {num_layers})")

    def describe(self) -> str:
        return f"vtw(k={self.k})"


VANILLA = Vanilla()


def fastv_kept(n_visual: Tensor, r: float) -> Tensor:
    """Visual tokens FastV keeps out of n_visual: round((1 - r) * n)."""
    return torch.round(n_visual.double() * (1.0 - r)).long()


def _layer_ids(layers: Iterable[object]) -> list[int]:
    """Layer ids as Python ints (numpy / torch integers too); ConfigError otherwise."""
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
    for layer in _layer_ids(layers):
        if not 0 <= layer < num_layers:
            raise ConfigError(f"layer id {layer} is out of range; the model has layers 0..{num_layers - 1}")
        if layer in seen:
            raise ConfigError(f"layer id {layer} is listed twice")
        seen.add(layer)
