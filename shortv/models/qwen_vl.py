"""Qwen2-VL / Qwen2.5-VL's weights and forward passes: vision transformer with its 2×2
patch merger → visual tokens spliced into the text → Qwen2 decoder with M-RoPE.

`QwenVLModel` is the torch module. What differs from LLaVA is only what a family supplies
to `VisionLanguageModule`: the tower (`shortv.models.qwen_vision`), images of any size
(each its own number of visual tokens, (h/28)·(w/28)), and 3-D positions: text tokens
advance all three streams together; an image's tokens share its start position on the
temporal stream and take start + row / start + column on the height / width streams; the
text after an image continues at start + max(rows, columns) (transformers'
`get_rope_index`). Methods that drop tokens keep the kept tokens' positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ..methods import VANILLA, Method
from .assembly import Run, VisionLanguageModule
from .llama import Decoder
from .protocols import LanguageModel
from .qwen_config import QwenVLConfig
from .qwen_vision import QwenVisionTower, merged_tokens
from .taps import Taps


class QwenVLModel(VisionLanguageModule):
    """The modules of a Qwen2-VL / Qwen2.5-VL model and its forward passes.

    Images arrive as `shortv.qwen_image.QwenImageProcessor` makes them: [T, H/28, W/28,
    4, patch_dim], the patches grouped by 2×2 merge block in transformers' order."""

    def __init__(self, config: QwenVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = QwenVisionTower(config.vision)
        self.decoder: LanguageModel = Decoder(config.text)
        self.eval()

    def image_features(self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], *,
                       method: Method = VANILLA, taps: Taps | None = None) -> list[Tensor]:
        """Visual tokens [N_i, D] per image, all images in one tower call; `taps` fire at
        the tower's blocks."""
        if not images:
            return []
        if method.reduces_images:
            raise InputError(f"{method.describe()} reduces the vision tower's tokens, which shortv "
                             "defines for LLaVA's CLIP tower only; use it with a LLaVA model")
        grids = [self._grid(im) for im in images]
        patches = torch.cat([im.flatten(0, 3) for im in images]).to(self.device, self.dtype)
        tokens = self.vision(patches, grids, taps=taps)
        merge = self.config.vision.spatial_merge_size
        return list(tokens.split([merged_tokens(grid, merge) for grid in grids]))

    @property
    def vision_depth(self) -> int:
        """The ViT's blocks."""
        return len(self.vision.blocks)

    def _grid(self, image: Tensor) -> tuple[int, int, int]:
        """(t, h, w) in patches of one preprocessed image."""
        v = self.config.vision
        m = v.spatial_merge_size
        if image.dim() != 5 or image.shape[3] != v.merge_unit or image.shape[4] != v.patch_dim:
            raise InputError(f"an image tensor of shape {tuple(image.shape)} is not this model's "
                             f"preprocessed image [T, H/{v.factor}, W/{v.factor}, {v.merge_unit}, "
                             f"{v.patch_dim}]; prepare images with the model's encode()")
        return image.shape[0], image.shape[1] * m, image.shape[2] * m

    def positions(self, runs: Sequence[Run], features: Sequence[Tensor]) -> Tensor:
        """M-RoPE positions [n, 3] of one spliced sequence."""
        parts, start = [], 0
        for run in runs:
            if run.image is None:
                parts.append(torch.arange(start, start + run.length).expand(3, -1))
                start += run.length
                continue
            t, rows, cols = run.image.shape[:3]
            if t * rows * cols != run.length:
                raise InputError(f"an image of {t}x{rows}x{cols} merged patches has {run.length} "
                                 "visual tokens; a method changed their number")
            grid = torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij")
            parts.append(torch.stack([g.flatten() for g in grid]) + start)
            start += max(rows, cols)
        return torch.cat(parts, dim=1).T.to(self.device)
