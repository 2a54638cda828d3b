"""Qwen2-VL / Qwen2.5-VL vision tower in plain torch.

Unlike CLIP, the tower takes images at their own resolution: an image arrives as a flat
list of patches (`shortv.qwen_image` lays them out as Qwen2VLImageProcessor does: each
2×2 block of patches consecutive, blocks in row-major order) together with its grid
(t, h, w in patches). Position is given by a 2-D rotary embedding (each head's first half
rotated by the patch's row, second half by its column), and attention is block-diagonal:
a patch sees only the patches of its own frame. Qwen2.5-VL narrows most blocks further to
112-pixel windows; its patches are reordered window by window before the blocks, so that
every window is a contiguous run, and its merged tokens are put back in image order at
the end. After the blocks, the merger turns each 2×2 block into one visual token of the
language model's width.

The parameters are named as in the published checkpoints below `visual.`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..ops import Linear
from .clip import ACTIVATIONS as CLIP_ACTIVATIONS
from .llama import RMSNorm
from .qwen_config import QWEN2_VL, QwenVisionConfig
from .rotary import apply_rope, inverse_frequencies
from .taps import Taps

ACTIVATIONS = {**CLIP_ACTIVATIONS, "silu": F.silu}
ROPE_THETA = 10000.0

Grid = tuple[int, int, int]


def merged_tokens(grid: Sequence[int], spatial_merge_size: int = 2) -> int:
    """Visual tokens the tower gives for an image of `grid` (t, h, w in patches): one per
    spatial_merge_size² patches."""
    t, h, w = grid
    return t * h * w // spatial_merge_size**2


def _norm(c: QwenVisionConfig, width: int) -> nn.Module:
    """Qwen2-VL normalises with LayerNorm, Qwen2.5-VL with RMSNorm (weight only)."""
    return nn.LayerNorm(width, eps=c.norm_eps) if c.variant == QWEN2_VL else RMSNorm(width, c.norm_eps)


@dataclass(frozen=True)
class Layout:
    """Where the patches of one forward pass sit, in the order the blocks see them.

    frames: lengths of the runs of rows that attend to each other in full-attention
        blocks (one per image frame).
    windows: the same for Qwen2.5-VL's window-attention blocks (None for Qwen2-VL).
    order: for Qwen2.5-VL, the merged-token permutation into window order (the blocks'
        merged token i is the image-order merged token order[i]); None when the blocks
        see the patches in image order.
    positions: each row's (row, column) in its image, [N, 2], in the blocks' order.
    """

    frames: list[int]
    windows: list[int] | None
    order: Tensor | None
    positions: Tensor


def _check_grids(patches: Tensor, grids: Sequence[Sequence[int]], c: QwenVisionConfig) -> list[Grid]:
    """The grids as int triples, after checking that they describe `patches`."""
    if patches.dim() != 2 or patches.shape[1] != c.patch_dim:
        raise InputError(f"the vision tower takes patches [N, {c.patch_dim}] (channels × "
                         f"temporal_patch_size × patch_size²), got {list(patches.shape)}; "
                         "preprocess images with shortv.qwen_image")
    checked: list[Grid] = []
    for grid in grids:
        values = tuple(int(v) for v in grid)
        m = c.spatial_merge_size
        if len(values) != 3 or min(values) < 1 or values[1] % m or values[2] % m:
            raise InputError(f"image grid {values} is not (t, h, w) in patches with h and w "
                             f"multiples of spatial_merge_size={m}")
        t, h, w = values
        checked.append((t, h, w))
    if not checked:
        raise InputError("the vision tower was given no image grids; give one (t, h, w) per image")
    total = sum(t * h * w for t, h, w in checked)
    if total != patches.shape[0]:
        raise InputError(f"the image grids {checked} hold {total} patches but {patches.shape[0]} "
                         "were given; give each image's grid in the order of its patches")
    return checked


def _grid_positions(grid: Grid, m: int, device: torch.device) -> Tensor:
    """(row, column) of each patch of one image, [t·h·w, 2], in the processor's order:
    m×m blocks row-major, the patches of a block row-major within it, frame after frame."""
    t, h, w = grid
    rows = torch.arange(h, device=device).view(h // m, 1, m, 1).expand(h // m, w // m, m, m)
    cols = torch.arange(w, device=device).view(1, w // m, 1, m).expand(h // m, w // m, m, m)
    return torch.stack((rows.flatten(), cols.flatten()), dim=-1).repeat(t, 1)


def _windows(grid: Grid, c: QwenVisionConfig, device: torch.device) -> tuple[Tensor, list[int]]:
    """Qwen2.5-VL's windows over one frame: the frame's merged tokens in window order
    (windows row-major over the frame, tokens row-major within each window) and each
    window's length in patches. Windows are window_size pixels square; those at the
    bottom and right edges are cut short where the side is not a multiple of it."""
    _, h, w = grid
    m = c.spatial_merge_size
    side = c.window_size // c.factor  # merged tokens per window side
    mh, mw = h // m, w // m
    across = -(-mw // side)
    window_of = (torch.arange(mh, device=device)[:, None] // side * across
                 + torch.arange(mw, device=device)[None, :] // side).flatten()
    order = torch.argsort(window_of, stable=True)
    lengths = torch.bincount(window_of) * c.merge_unit
    return order, lengths.tolist()


def layout(grids: Sequence[Grid], c: QwenVisionConfig, device: torch.device) -> Layout:
    """The attention runs, window order and rotary positions for images of `grids`."""
    m = c.spatial_merge_size
    frames = [h * w for t, h, w in grids for _ in range(t)]
    positions = torch.cat([_grid_positions(g, m, device) for g in grids])
    if not c.windowed:
        return Layout(frames, None, None, positions)
    orders, windows, offset = [], [], 0
    for grid in grids:
        frame_order, lengths = _windows(grid, c, device)
        per_frame = grid[1] * grid[2] // c.merge_unit
        for _ in range(grid[0]):
            orders.append(frame_order + offset)
            windows += lengths
            offset += per_frame
    order = torch.cat(orders)
    return Layout(frames, windows, order, positions[_patch_rows(order, c.merge_unit)])


def _patch_rows(order: Tensor, unit: int) -> Tensor:
    """A merged-token permutation as a patch permutation (each token's `unit` patches
    stay together, in their order)."""
    return (order[:, None] * unit + torch.arange(unit, device=order.device)).flatten()


def _inverse(order: Tensor) -> Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


def rotary_tables(positions: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos and sin [N, head_dim], fp32, for (row, column) positions [N, 2]: head_dim/4
    frequencies per axis; the row's angles then the column's fill half a head, and the
    second half repeats them (the pairs `apply_rope` rotates are i and i + head_dim/2)."""
    inv_freq = inverse_frequencies(head_dim // 2, ROPE_THETA, torch.float32, positions.device)
    angles = (positions.float()[..., None] * inv_freq).flatten(1)  # [N, head_dim/2]: rows, cols
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class PatchEmbed(nn.Module):
    """The Conv3d patch embedding (kernel = stride = one patch, no bias), computed as a
    matrix product over the flattened patches: the same weights, without the
    convolution's overhead on N tiny inputs. The parameter keeps the checkpoint's Conv3d
    shape [width, channels, T, P, P], whose flattening matches the patches' layout."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.channels, c.width, kernel, kernel, bias=False)

    def forward(self, patches: Tensor) -> Tensor:
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.flatten(1))


class QwenVisionAttention(nn.Module):
    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.qkv = Linear(c.width, 3 * c.width)
        self.proj = Linear(c.width, c.width)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], runs: Sequence[int]) -> Tensor:
        """Self-attention over x [N, width] within each run of `runs` consecutive rows.

        One SDPA call per run: measured on the CPU for real image sizes (1–5 k patches,
        20–80 windows), it was as fast as batching equal-length windows (whose gathers
        cost what batching saves) and much faster than one call with a block-diagonal
        mask (which computes every cross-run score)."""
        n, width = x.shape
        qkv = self.qkv(x, contiguous=True).view(n, 3, self.heads, width // self.heads)
        q, k = (self._rotate(qkv[:, i], rope) for i in (0, 1))
        v = qkv[:, 2]
        out = torch.empty_like(v)
        start = 0
        for length in runs:
            run = slice(start, start + length)
            heads_first = [y[run].transpose(0, 1) for y in (q, k, v)]
            out[run] = F.scaled_dot_product_attention(*heads_first).transpose(0, 1)
            start += length
        return self.proj(out.view(n, width))

    @staticmethod
    def _rotate(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """Rotary embedding on x [N, heads, head_dim], computed in fp32 as Qwen does."""
        cos, sin = rope
        return apply_rope(x.float()[None], cos[None], sin[None])[0].to(x.dtype)


class QwenVisionMLP(nn.Module):
    """Qwen2-VL's MLP: fc1 → activation → fc2."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[c.act]
        self.fc1 = Linear(c.width, c.mlp_dim)
        self.fc2 = Linear(c.mlp_dim, c.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class QwenVisionGatedMLP(nn.Module):
    """Qwen2.5-VL's MLP: down(act(gate(x)) · up(x)), every projection with a bias."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[c.act]
        self.gate_proj = Linear(c.width, c.mlp_dim)
        self.up_proj = Linear(c.width, c.mlp_dim)
        self.down_proj = Linear(c.mlp_dim, c.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class QwenVisionBlock(nn.Module):
    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.norm1 = _norm(c, c.width)
        self.attn = QwenVisionAttention(c)
        self.norm2 = _norm(c, c.width)
        self.mlp = QwenVisionMLP(c) if c.variant == QWEN2_VL else QwenVisionGatedMLP(c)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], runs: Sequence[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, runs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each merge unit (2×2 block: consecutive patches) → one token of the language
    model's width: normalise each patch, concatenate the block, then an MLP."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        merged = c.width * c.merge_unit
        self.ln_q = _norm(c, c.width)
        self.mlp = nn.Sequential(Linear(merged, merged), nn.GELU(), Linear(merged, c.out_width))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class QwenVisionTower(nn.Module):
    """The Qwen2-VL or Qwen2.5-VL vision transformer with its patch merger
    (config.variant chooses)."""

    def __init__(self, config: QwenVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(QwenVisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    @overload
    def forward(self, patches: Tensor, grids: Sequence[Sequence[int]], *,
                hidden_layers: None = None) -> Tensor: ...

    @overload
    def forward(self, patches: Tensor, grids: Sequence[Sequence[int]], *,
                hidden_layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]: ...

    def forward(self, patches: Tensor, grids: Sequence[Sequence[int]], *,
                hidden_layers: Sequence[int] | None = None,
                taps: Taps | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Visual tokens [N / merge_unit, out_width] of all images, concatenated in their
        order, for their patches [N, patch_dim] (in Qwen2VLImageProcessor's order) and
        grids (t, h, w in patches per image, as image_grid_thw).

        With `hidden_layers`, also the hidden states [N, width] at those indices (0 = the
        patch embeddings, i = the output of block i), each in the patches' order. `taps`
        fire at each block's output ([1, N, width], in the patches' order)."""
        c = self.config
        grids = _check_grids(patches, grids, c)
        wanted = set(hidden_layers or ())
        if any(not 0 <= i <= c.depth for i in wanted):
            raise InputError(f"hidden_layers {sorted(wanted)} must lie in 0..{c.depth} "
                             f"(0 = the patch embeddings, {c.depth} = the last block's output)")
        plan = layout(grids, c, patches.device)
        rows = None if plan.order is None else _patch_rows(plan.order, c.merge_unit)
        x = self.patch_embed(patches if rows is None else patches[rows])
        rope = rotary_tables(plan.positions, c.head_dim)
        full = set(c.fullatt_block_indexes)
        states = {0: x} if 0 in wanted else {}
        back = None if rows is None else _inverse(rows)
        for i, block in enumerate(self.blocks):
            windows = plan.windows is not None and i not in full
            x = block(x, rope, plan.windows if windows else plan.frames)
            if taps is not None:  # hooks see (and write) the patches in the processor's order
                seen = taps.vision(i, (x if back is None else x[back])[None])[0]
                x = seen if rows is None else seen[rows]
            if i + 1 in wanted:
                states[i + 1] = x
        tokens = self.merger(x)
        if plan.order is not None:
            tokens = tokens[_inverse(plan.order)]
        if hidden_layers is None:
            return tokens
        return tokens, [states[i] if back is None else states[i][back] for i in hidden_layers]
