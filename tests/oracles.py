"""Reference computations shared by the parity, image and loading tests.

Everything here is written independently of shortv's own code paths (apart from the
key maps under test), so that a test compares shortv against transformers / open_clip /
plain torch rather than against itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- images -------------------------------------------------------------------------------


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def expand2square(image: Image.Image, mean=OPENAI_CLIP_MEAN) -> Image.Image:
    """Original LLaVA's `expand2square` (llava/mm_utils.py), with the CLIP mean colour."""
    background = tuple(int(x * 255) for x in mean)
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def clip_processor(size: int):
    """transformers' CLIP image processor (PIL backend) at `size`, as LLaVA-1.5 uses it."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )


def reference_pixels(image: Image.Image, size: int, *, pad: bool = True) -> torch.Tensor:
    """[3, size, size]: LLaVA-1.5's preprocessing done by transformers on an RGB image."""
    image = expand2square(image) if pad else image
    return clip_processor(size)(image, return_tensors="pt")["pixel_values"][0]


# ---- transformers inputs ------------------------------------------------------------------


def hf_input_ids(ids: torch.Tensor, image_token_index: int, tokens_per_image: int) -> torch.Tensor:
    """[1, T]: each -200 placeholder expanded into `tokens_per_image` image tokens, the way
    llava-hf's processor prepares prompts."""
    out: list[int] = []
    for i in ids.tolist():
        out.extend([image_token_index] * tokens_per_image if i == -200 else [i])
    return torch.tensor([out], dtype=torch.long)


def hf_tokens_per_image(config) -> int:
    """Visual tokens per image of a transformers LlavaConfig (LLaVA-1.5: patches, + CLS
    with the 'full' strategy)."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (config.vision_feature_select_strategy == "full")


# ---- weights ------------------------------------------------------------------------------


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Random weights of a useful size (norm weights near 1, biases and embeddings non-zero)
    so that a wrong mapping or a wrong op shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
            is_norm = "norm" in owner or owner.startswith("ln")
            if p.dim() == 1 and is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * 0.5 / p.shape[-1] ** 0.5)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    assert all(k.startswith(prefix) for k in state), [k for k in state if not k.startswith(prefix)]
    return {k[len(prefix):]: v for k, v in state.items()}


def map_state(state: dict[str, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    """Rename a state dict with a shortv KeyMap layout, dropping known-unused tensors and
    failing on unknown ones."""
    from shortv.checkpoint import KeyMap

    key_map = KeyMap(layout)
    out = {}
    for key, value in state.items():
        name = key_map(key)
        assert name is not False, f"unknown key {key}"
        if name is not None:
            out[name] = value
    return out


# ---- files --------------------------------------------------------------------------------


_built: dict[tuple, Path] = {}


def original_bin_checkpoint(hf_dir: Path, out: Path) -> Path:
    """hf_dir in original LLaVA-1.5's layout as 3 `.bin` shards with rotary buffers
    (built once per session and shared between test modules)."""
    from . import checkpoints

    key = ("bin", hf_dir)
    if key not in _built:
        _built[key] = checkpoints.to_original(hf_dir, out, fmt="bin", shards=3,
                                              rotary_buffers=True)
    return _built[key]
