"""Rotary position embeddings (RoPE), the 1-D form Llama / Vicuna / Mistral use.

Three pieces: the inverse frequencies of a head's rotation pairs, the cos / sin tables of
integer positions, and rotating queries or keys by those tables. A decoder builds the
tables once per pass (`shortv.models.llama.Segment`) and rotates per layer. A multi-stream
variant (M-RoPE, Qwen2-VL: positions [B, T, 3], one stream per section of the head
dimension) only changes how the tables are built: `rope_tables(..., sections=...)`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_frequencies(head_dim: int, theta: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """theta^(-2i / head_dim) for i < head_dim / 2, [head_dim / 2], in `dtype`: the angle
    per position of each rotated pair of a head's dimensions."""
    steps = torch.arange(0, head_dim, 2, device=device, dtype=dtype)
    return 1.0 / (theta ** (steps / head_dim))


def rope_tables(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype,
    sections: tuple[int, ...] = (),
) -> tuple[Tensor, Tensor]:
    """cos and sin, [B, T, head_dim], for integer positions [B, T] (computed in fp32, or
    fp64 for an fp64 model).

    With `sections` (M-RoPE, Qwen2-VL), positions are [B, T, 3] (temporal, height, width)
    and the head's rotated pairs are split in three runs of those sizes, in order: pair i
    turns by the position of its run's stream. Both halves of the head use the same
    split, so `apply_rope` is unchanged."""
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = inverse_frequencies(head_dim, theta, work, positions.device)
    if sections:
        # Each pair's position: stream i's for the i-th run of `sections` pairs ([B, T, D/2]).
        lead = positions.shape[:-1]
        per_pair = torch.cat([positions[..., i:i + 1].expand(*lead, n) for i, n in enumerate(sections)],
                             dim=-1)
        freqs = per_pair.to(work) * inv_freq
    else:
        freqs = positions.to(work)[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, D] by tables [B, T, D]: x·cos + rotate_half(x)·sin, written as
    one product and two in-place halves (several times faster than the textbook form)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out
