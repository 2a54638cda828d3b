"""ShortV (Freezing Visual Tokens in Ineffective Layers, ICCV 2025).

In the frozen layers visual tokens are *frozen* (docs/design.md §6): their hidden states
pass through unchanged, they are neither attention queries nor MLP inputs, but their keys
and values are still computed and attended by the other tokens. Which layers: the first N
of a Layer Contribution ranking (`shortv.ranking`), or ids named exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..token_types import TokenType
from .base import Hook, Method, check_layer_ids, layer_ids


@dataclass(frozen=True)
class ShortV(Method):
    """Freeze visual tokens in `layers` (stored sorted)."""

    layers: tuple[int, ...] = ()
    name = "shortv"
    hooks = frozenset({Hook.LAYERS})

    def __post_init__(self) -> None:
        ids = layer_ids(self.layers)
        for layer in ids:
            if layer < 0 or ids.count(layer) > 1:
                raise ConfigError(f"ShortV layers={tuple(ids)}: layer {layer} is not allowed; use distinct "
                                  "layer ids >= 0")
        object.__setattr__(self, "layers", tuple(sorted(ids)))

    def frozen_type(self, layer: int) -> TokenType | None:
        return TokenType.VISUAL if layer in self.layers else None

    def validate(self, num_layers: int) -> None:
        check_layer_ids(self.layers, num_layers)

    def describe(self) -> str:
        return f"shortv(n_frozen={len(self.layers)}, layers={list(self.layers)})"
