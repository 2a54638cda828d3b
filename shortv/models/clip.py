"""CLIP ViT vision tower in plain torch.

Class token, learned position embeddings, a LayerNorm *before* the encoder (CLIP's
`pre_layrnorm`), pre-norm transformer layers with quick_gelu MLPs. LLaVA reads a hidden
state from inside the encoder (the penultimate one by default), so only the layers up to
the deepest selected one are built and run; CLIP's final LayerNorm is never used.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import Linear
from .config import VisionConfig
from .protocols import TowerOutput
from .taps import Taps


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class ClassAttention(NamedTuple):
    """What one attention layer reports for VisionZip: the class token's attention
    probabilities over every token [N, heads, T] and the keys [N, heads, T, head_dim]."""

    attention: Tensor
    keys: Tensor


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.q_proj = Linear(c.width, c.width)
        self.k_proj = Linear(c.width, c.width)
        self.v_proj = Linear(c.width, c.width)
        self.out_proj = Linear(c.width, c.width)

    def forward(self, x: Tensor, class_attention: bool = False) -> tuple[Tensor, ClassAttention | None]:
        """Self-attention over x [N, T, width], and with `class_attention` the class
        token's attention and the keys (what VisionZip reads; None otherwise)."""
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = (split(proj(x, contiguous=True)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        reported = None
        if class_attention:
            logits = q[:, :, :1].float() @ k.float().transpose(-1, -2) / math.sqrt(d // self.heads)
            reported = ClassAttention(logits.softmax(dim=-1)[:, :, 0], k)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d)), reported


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        if c.act not in ACTIVATIONS:
            raise ConfigError(f"vision hidden_act {c.act!r} is not supported; use {list(ACTIVATIONS)}")
        self.act = ACTIVATIONS[c.act]
        self.fc1 = Linear(c.width, c.mlp_dim)
        self.fc2 = Linear(c.mlp_dim, c.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.attn = VisionAttention(c)
        self.norm2 = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x: Tensor, class_attention: bool = False) -> tuple[Tensor, ClassAttention | None]:
        """The layer's output and, with `class_attention`, what its attention reports."""
        attended, reported = self.attn(self.norm1(x), class_attention)
        x = x + attended
        return x + self.mlp(self.norm2(x)), reported


class CLIPVisionTower(nn.Module):
    """CLIP ViT with the first `depth` encoder layers (all of them by default)."""

    def __init__(self, c: VisionConfig, depth: int | None = None) -> None:
        super().__init__()
        self.config = c
        depth = c.layers if depth is None else depth
        self.patch_embed = nn.Conv2d(c.channels, c.width, c.patch_size, c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(c.width))
        self.position_embedding = nn.Parameter(torch.empty(c.num_patches + 1, c.width))
        self.pre_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(depth))

    def forward(self, pixels: Tensor, hidden_indices: tuple[int, ...], *,
                class_attention: bool = False, taps: Taps | None = None) -> TowerOutput:
        """Hidden states [N, 1 + patches, width] at `hidden_indices` (0 = the embeddings
        after the pre-norm, i = the output of layer i) for images [N, 3, S, S]. With
        `class_attention`, also the class-token attention and keys of the layer that
        outputs the last of them (none when that is the embeddings). `taps` fire at each
        layer's output (vision.resid_post of layer i - 1, 0-based)."""
        if max(hidden_indices) > len(self.layers):
            raise ValueError(f"hidden state {max(hidden_indices)} needs more than {len(self.layers)} layers")
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat((cls, x), dim=1) + self.position_embedding
        x = self.pre_norm(x)
        states = {0: x}
        reported = None
        for i, layer in enumerate(self.layers[: max(hidden_indices)], start=1):
            x, got = layer(x, class_attention and i == hidden_indices[-1])
            if got is not None:
                reported = got
            if taps is not None:
                x = taps.vision(i - 1, x)
            states[i] = x
        hidden = [states[i] for i in hidden_indices]
        return TowerOutput(hidden) if reported is None else TowerOutput(hidden, *reported)
