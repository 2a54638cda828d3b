"""Common interventions as hooks for `run_with_hooks` / `generate(..., hooks=...)`: each
function returns `fn(x, types) -> Tensor`, which changes the rows of x [B, T, D] it selects
by token type and/or sequence positions (both given: rows that match both; neither: every
real token). In a decode step x is the new token alone ([B, 1, D]), so selecting by
positions only acts at the prefill."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.taps import ActivationCache, HookFn
from ..token_types import TokenType


def zero_ablate(token_type: TokenType | None = None, positions: Sequence[int] | None = None) -> HookFn:
    """Set the selected rows to zero."""
    def fn(x: Tensor, types: Tensor) -> Tensor:
        return x.masked_fill(_selected(types, token_type, positions)[..., None], 0.0)
    return fn


def mean_ablate(token_type: TokenType | None = None, positions: Sequence[int] | None = None,
                mean: Tensor | None = None) -> HookFn:
    """Replace the selected rows by `mean` [D] (e.g. the mean over a data set, taken with
    `run_with_cache`), or by default by the mean of each sequence's selected rows."""
    def fn(x: Tensor, types: Tensor) -> Tensor:
        rows = _selected(types, token_type, positions)
        if mean is not None:
            value = mean.to(x.dtype).expand_as(x)
        else:
            weights = rows[..., None].to(x.dtype)
            value = ((x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1))
            value = value.expand_as(x)
        return torch.where(rows[..., None], value, x)
    return fn


def patch(cache: ActivationCache, name: str, layer: int, token_type: TokenType | None = None,
          positions: Sequence[int] | None = None) -> HookFn:
    """Replace the selected rows by the same rows of another run's `cache[name, layer]`
    (activation patching; the two inputs must have the same length)."""
    source = cache[name, layer]

    def fn(x: Tensor, types: Tensor) -> Tensor:
        if source.shape != x.shape:
            raise ConfigError(f"cannot patch {name} of layer {layer}: the cached run has shape "
                              f"{tuple(source.shape)}, this one {tuple(x.shape)} (patch inputs of the "
                              "same length)")
        rows = _selected(types, token_type, positions)
        return torch.where(rows[..., None], source.to(device=x.device, dtype=x.dtype), x)
    return fn


def steer(vector: Tensor, scale: float = 1.0, token_type: TokenType | None = None,
          positions: Sequence[int] | None = None) -> HookFn:
    """Add `scale` · `vector` [D] to the selected rows (activation steering)."""
    def fn(x: Tensor, types: Tensor) -> Tensor:
        rows = _selected(types, token_type, positions)
        return x + rows[..., None] * (scale * vector.to(device=x.device, dtype=x.dtype))
    return fn


def _selected(types: Tensor, token_type: TokenType | None, positions: Sequence[int] | None) -> Tensor:
    """[B, T] the rows of real tokens of `token_type` and/or at `positions`."""
    rows = types != int(TokenType.PAD)
    if token_type is not None:
        rows = rows & (types == int(TokenType(token_type)))
    if positions is not None:
        at = torch.zeros(types.shape[1], dtype=torch.bool, device=types.device)
        index = torch.tensor([p for p in positions if -types.shape[1] <= p < types.shape[1]],
                             dtype=torch.long, device=types.device)
        at[index] = True
        rows = rows & at
    return rows
