"""VTW (Visual Token Withdrawal, AAAI 2025): drop all visual tokens from layer k on.

k defaults to half the decoder's layers: the paper's K=16 for 32 layers, K=20 for 40.
k must be a layer of the model: VTW has no budget, and k = L (withdraw nothing) is refused
rather than read as the vanilla model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from ..errors import ConfigError
from .base import Hook, LayerView, Method, check_int


@dataclass(frozen=True)
class VTW(Method):
    """Withdraw every visual token (hidden states and KV cache) before layer `k`
    (None: half the layers, filled in by `for_layers`)."""

    k: int | None = None
    name = "vtw"
    hooks = frozenset({Hook.TOKENS})

    def __post_init__(self) -> None:
        if self.k is not None:
            check_int(self.k, "VTW k", minimum=0, allowed="a layer id >= 0 (None: half the layers)")

    def for_layers(self, num_layers: int) -> VTW:
        fitted = replace(self, k=num_layers // 2) if self.k is None else self
        fitted.validate(num_layers)
        return fitted

    def drops_at(self, layer: int) -> bool:
        return layer == self.k

    def keep(self, view: LayerView) -> Tensor:
        return ~view.visual()

    def validate(self, num_layers: int) -> None:
        if self.k is None or self.k >= num_layers:
            raise ConfigError(f"VTW k={self.k!r} is out of range; use 0 <= k < {num_layers} (the model's "
                              "layers)")

    def describe(self) -> str:
        return f"vtw(k={'half the layers' if self.k is None else self.k})"
