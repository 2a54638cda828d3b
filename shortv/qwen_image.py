"""Image preprocessing for Qwen2-VL and Qwen2.5-VL, as transformers' PIL-based
`Qwen2VLImageProcessorPil` does it (also what Qwen's qwen-vl-utils + processor path gives).

Unlike LLaVA, the image keeps (close to) its own size and shape: `smart_resize` picks
sides that are multiples of patch_size × spatial_merge_size (28) with an area between
min_pixels and max_pixels, the image is resized to them (bicubic, PIL), scaled to 0..1,
normalised with CLIP's mean / std and cut into 14×14 patches. Each patch is repeated
temporal_patch_size times, as if the image were a video of identical frames, because the
tower's patch embedding is a 3-D convolution over (time, height, width).

Note: transformers 5's default `AutoImageProcessor` for these models is the torchvision
one (`Qwen2VLImageProcessor`); its bicubic kernel differs from PIL's, so its pixels differ
from these by up to ~0.1 after normalisation (a few grey levels).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from PIL import Image
from torch import Tensor

from .errors import InputError
from .image import BICUBIC, to_rgb
from .models.qwen_config import QwenPreprocess, QwenVisionConfig, QwenVLConfig

# transformers refuses images whose longer side is more than this many times the shorter.
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) to resize an image to: both multiples of `factor`, the area within
    [min_pixels, max_pixels] where rounding allows, the aspect ratio kept as well as it can be.

    Each side is first rounded to the nearest multiple of `factor` (Python's round: halves go
    to even). If that area is too large both sides are scaled down by the same factor and
    floored (never below `factor`); if too small, scaled up and ceiled. An image too thin
    (aspect ratio over 200) is refused, as transformers does.
    """
    if height < 1 or width < 1:
        raise InputError(f"image has no pixels ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"image of {width}x{height} pixels has an aspect ratio of {ratio:g}, over the limit of "
            f"{MAX_ASPECT_RATIO} that Qwen2-VL's preprocessing accepts; crop or pad it to a less "
            "elongated shape")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def grid_of(pixels: Tensor) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of a `QwenImageProcessor` output, transformers'
    `image_grid_thw` row: t frames, h × w patches of 14 pixels."""
    if pixels.dim() != 5:
        raise InputError(f"expected Qwen2-VL pixels [T, H/28, W/28, merge², patch_dim], "
                         f"got a tensor of shape {tuple(pixels.shape)}")
    t, rows, cols, unit, _ = pixels.shape
    merge = math.isqrt(unit)
    if merge * merge != unit:
        raise InputError(f"Qwen2-VL pixels: dimension 3 ({unit}) is not a square merge unit")
    return t, rows * merge, cols * merge


class QwenImageProcessor:
    """Turns a PIL image into the patches a Qwen2-VL / Qwen2.5-VL tower takes:
    [T, H/28, W/28, 4, patch_dim] float32 with T = 1, where `.flatten(0, 3)` is transformers'
    `pixel_values` (rows in its order: 2×2 merge groups row-major, then the patches of each
    group row-major) and `grid_of` its `image_grid_thw`.

    `min_pixels` / `max_pixels` override the checkpoint's (preprocessor_config.json) bounds
    on the resized area: fewer pixels, fewer visual tokens (one per 28×28 pixels).
    """

    def __init__(self, preprocess: QwenPreprocess | None = None,
                 vision: QwenVisionConfig | None = None, *,
                 min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        preprocess = preprocess or QwenPreprocess()
        overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
                     if v is not None}
        # Rebuilding the dataclass validates the bounds (ConfigError when min > max, ...).
        self.preprocess = dataclasses.replace(preprocess, **overrides) if overrides else preprocess
        self.vision = vision or QwenVisionConfig()

    @classmethod
    def for_config(cls, config: QwenVLConfig, *, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> QwenImageProcessor:
        return cls(config.preprocess, config.vision, min_pixels=min_pixels, max_pixels=max_pixels)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of that size is resized to."""
        h, w = smart_resize(height, width, self.vision.factor, self.preprocess.min_pixels,
                            self.preprocess.max_pixels)
        return w, h

    def __call__(self, image: Image.Image) -> Tensor:
        image = rgb_on_white(image)
        size = self.target_size(*image.size)
        if size != image.size:
            image = image.resize(size, resample=BICUBIC)
        return self.patchify(self.normalise(image))

    def normalise(self, image: Image.Image) -> Tensor:
        """[3, H, W] float32: scaled by 1/255 in float64 then cast, normalised in float32,
        the same arithmetic as transformers' rescale and normalize."""
        w, h = image.size
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
        x = (pixels.permute(2, 0, 1).double() * (1 / 255)).float()
        mean = torch.tensor(self.preprocess.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.preprocess.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def patchify(self, x: Tensor) -> Tensor:
        """[C, H, W] -> [1, H/(p·m), W/(p·m), m², C·T·p·p] for patch size p, merge size m and
        temporal patch size T: within a merge group the m×m patches row-major, within a patch
        the values ordered (channel, frame, row, column), the one frame repeated T times."""
        v = self.vision
        p, m, frames = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
        c, h, w = x.shape
        rows, cols = h // (p * m), w // (p * m)
        x = x.view(c, rows, m, p, cols, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # rows, cols, m, m, c, p, p
        x = x.unsqueeze(5).expand(rows, cols, m, m, c, frames, p, p)
        return x.reshape(1, rows, cols, m * m, c * frames * p * p)


def rgb_on_white(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, transparency composited onto white (as transformers'
    convert_to_rgb and qwen-vl-utils do; LLaVA's `to_rgb` drops the alpha instead)."""
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return to_rgb(image)


def qwen_token_boxes(size: tuple[int, int], target: tuple[int, int], factor: int) -> Tensor:
    """The box (x0, y0, x1, y1), in the original image's pixels, that each visual token of
    an image of `size` sees: the image is resized to `target` (width, height; multiples of
    `factor`, the merged patch side) and each token is one factor × factor cell, row by row."""
    w, h = size
    tw, th = target
    rows, cols = th // factor, tw // factor
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    boxes = torch.stack((c, r, c + 1, r + 1), dim=-1).reshape(-1, 4) * factor
    return boxes * torch.tensor([w / tw, h / th] * 2, dtype=torch.float64)
