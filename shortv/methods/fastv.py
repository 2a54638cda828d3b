"""FastV (An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024).

At layer k keep the (1 - r) fraction of each sequence's visual tokens that the last token
attended to most in layer k - 1 (mean over heads); drop the rest for layers k.. (hidden
states and KV cache). Kept tokens keep their RoPE positions. In generation the choice is
made once, at prefill, by the last prompt token, as FastV's own inference does;
recomputing a longer sequence from scratch would re-rank with its own last token.
r = 0 keeps every token: no ranking and no drop, the vanilla model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Capture, Hook, LayerView, Method, Queries, check_int
from .select import top_visual


@dataclass(frozen=True)
class FastV(Method):
    """Drop the fraction `r` of visual tokens least attended by the last token, at layer `k`."""

    k: int = 2
    r: float = 0.5
    name = "fastv"
    hooks = frozenset({Hook.TOKENS})

    def __post_init__(self) -> None:
        check_int(self.k, "FastV k", allowed="a layer id >= 1 (FastV ranks with layer k - 1)")
        r = self.r
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ConfigError(f"FastV r={r!r} is not allowed; use a fraction in [0, 1] (0 keeps every token)")

    def drops_at(self, layer: int) -> bool:
        return layer == self.k and self.r > 0  # r = 0 keeps every token: no drop

    def capture(self, layer: int) -> Capture | None:
        return Capture(queries=Queries.LAST) if self.drops_at(layer + 1) else None

    def keep(self, view: LayerView) -> Tensor:
        scores = view.require_scores("FastV")[:, 0]
        visual = view.visual()
        return ~visual | top_visual(scores, visual, fastv_kept(visual.sum(dim=1), self.r))

    def validate(self, num_layers: int) -> None:
        if self.k >= num_layers:
            raise ConfigError(f"FastV k={self.k} is out of range; use 1 <= k < {num_layers} (the model's "
                              "layers)")

    def describe(self) -> str:
        return f"fastv(k={self.k}, r={self.r})"


def fastv_kept(n_visual: Tensor, r: float) -> Tensor:
    """Visual tokens FastV keeps out of n_visual: round((1 - r) * n)."""
    return torch.round(n_visual.double() * (1.0 - r)).long()
