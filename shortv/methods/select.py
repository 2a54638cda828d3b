"""Token selection shared by the methods that drop visual tokens by a score (FastV, PDrop,
SparseVLM): one ranking rule, so that they break ties alike."""

from __future__ import annotations

import torch
from torch import Tensor


def top_visual(scores: Tensor, visual: Tensor, n_keep: Tensor) -> Tensor:
    """[B, T] True at each row's n_keep[b] visual tokens of highest score (ties: the
    earlier position first)."""
    ranked = scores.float().masked_fill(~visual, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return visual & (rank < n_keep[:, None])
