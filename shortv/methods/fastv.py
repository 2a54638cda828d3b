"""FastV (An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024).

At layer k keep the (1 - r) fraction of each sequence's visual tokens that the last token
attended to most in layer k - 1 (mean over heads); drop the rest for layers k.. (hidden
states and KV cache). Kept tokens keep their RoPE positions. In generation the choice is
made once, at prefill, by the last prompt token, as FastV's own inference does;
recomputing a longer sequence from scratch would re-rank with its own last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..token_types import TokenType
from .base import Method


@dataclass(frozen=True)
class FastV(Method):
    """Drop the fraction `r` of visual tokens least attended by the last token, at layer `k`."""

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
        n_keep = fastv_kept(visual.sum(dim=1), self.r)
        # Rank visual tokens by score (non-visual ones last) and keep each row's top n_keep.
        ranked = scores.float().masked_fill(~visual, float("-inf"))
        order = ranked.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        return ~visual | (rank < n_keep[:, None])

    def validate(self, num_layers: int) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ConfigError(f"FastV k={self.k!r} must be an integer layer id")
        if not 1 <= self.k:
            raise ConfigError(f"FastV k={self.k} must be >= 1 (it ranks with layer k - 1)")
        if self.k >= num_layers:
            raise ConfigError(f"FastV k={self.k} must be < the model's {num_layers} layers")
        if isinstance(self.r, bool) or not isinstance(self.r, (int, float)) or not 0.0 <= self.r <= 1.0:
            raise ConfigError(f"FastV r={self.r!r} must be a fraction in [0, 1]")

    def describe(self) -> str:
        return f"fastv(k={self.k}, r={self.r})"


def fastv_kept(n_visual: Tensor, r: float) -> Tensor:
    """Visual tokens FastV keeps out of n_visual: round((1 - r) * n)."""
    return torch.round(n_visual.double() * (1.0 - r)).long()
