"""The interface every method implements, and the vanilla model.

The decoder asks a method four questions at every layer (see `Method`); a method answers
from its own parameters, so adding one touches its module and the registry in
`shortv.methods`, not the decoder.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..token_types import TokenType


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

    def for_layers(self, num_layers: int) -> Method:
        """This method for a decoder of `num_layers`: defaults that depend on the depth
        filled in (VTW's k), then validated. The decoder only runs fitted methods."""
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


def parse_layer_list(text: str) -> list[int]:
    """"31,29,30" → [31, 29, 30] (spaces allowed); ConfigError for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(p.lstrip("-").isdigit() for p in parts):
        raise ConfigError(f"{text!r} is not a comma-separated list of layer ids (e.g. 31,29,30)")
    return [int(p) for p in parts]
