"""open_clip (OpenAI-style) VisionTransformer weights in our CLIP tower's names: how the
tests check shortv's tower against open_clip, an independent CLIP implementation."""

from __future__ import annotations

import re

import torch

from shortv.checkpoint import KeyMap
from shortv.errors import CheckpointError

# An open_clip (OpenAI-style) VisionTransformer: other names, and q/k/v packed in one
# `in_proj` tensor (target "qkv", split by `open_clip_tower_state`). The pooling head is
# not part of LLaVA's tower.
OPEN_CLIP_KEYS: list[tuple[str, str | None]] = [
    (r"conv1\.weight", "patch_embed.weight"),
    (r"class_embedding", "class_embedding"),
    (r"positional_embedding", "position_embedding"),
    (r"ln_pre\.(weight|bias)", r"pre_norm.\1"),
    (r"ln_post\.(?:weight|bias)|proj", None),
    (r"transformer\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)", r"layers.\1.norm\2.\3"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"layers.\1.attn.out_proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"layers.\1.mlp.fc2.\2"),
]


def open_clip_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters of our CLIPVisionTower (names without the `vision.` prefix) from an
    open_clip VisionTransformer's state dict, or a whole open_clip CLIP model's
    (`visual.*`; its text tower is ignored). Packed q/k/v projections are split. Tensors
    that have no place in a CLIP ViT tower (LayerScale, attentional pooling, ...) raise
    CheckpointError naming them. The tower's shape (heads in particular) is not in the
    state dict: take it from the open_clip model config."""
    prefix = "visual." if any(k.startswith("visual.") for k in state) else ""
    key_map = KeyMap([(re.escape(prefix), "", OPEN_CLIP_KEYS)])
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key_map(key)
        if name is False:
            unknown.append(key)
        elif name is not None and ".attn.qkv." in name:
            for proj, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[name.replace(".qkv.", f".{proj}_proj.")] = chunk
        elif name is not None:
            out[name] = value
    if unknown:
        raise CheckpointError(f"open_clip tensors with no place in a CLIP ViT tower: {unknown}")
    return out
