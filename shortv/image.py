"""Image preprocessing exactly as original LLaVA does it (docs/design.md §5).

- "pad" (LLaVA-1.5): paste onto a square canvas in the CLIP mean colour, then CLIP's
  processing (bicubic resize of the shortest side, centre crop, scale, normalise).
- "anyres" (LLaVA-NeXT): pick a grid pinpoint, resize keeping the aspect ratio, pad
  centred with black, cut into tiles, and prepend the whole image resized to a square.
- "square": CLIP's processing alone.

Also the anyres geometry (pinpoint choice, grid shape, unpadding) that the feature side
of LLaVA-NeXT shares with the pixel side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .config import LlavaConfig
from .errors import InputError

BICUBIC = Image.Resampling.BICUBIC


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (so a broken file fails here, not later)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise InputError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"image path is a directory, not an image file: {path}") from None
    except Image.DecompressionBombError as e:
        # PIL refuses images over twice MAX_IMAGE_PIXELS to guard against decompression bombs.
        raise InputError(
            f"{path} is too large to open safely ({e}); PIL's limit is "
            f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels (refused above twice that): "
            "downscale the image, or raise the limit with `PIL.Image.MAX_IMAGE_PIXELS = N` "
            "if you trust the file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"cannot read {path} as an image ({e.__class__.__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. Alpha is dropped like LLaVA's `convert('RGB')`;
    16/32-bit integer and float greyscale are scaled to 8 bits rather than clipped."""
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise InputError(f"image has no pixels (size {image.size})")
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit by definition, whatever its content
        image = image.convert("I").point(lambda v: v * (255 / 65535)).convert("L")
    elif image.mode in ("I", "F"):
        _, hi = image.getextrema()
        # 32-bit integers wider than 8 bits are read as 16-bit; floats in 0..1 as fractions.
        scale = 255 / 65535 if hi > 255 else (255.0 if image.mode == "F" and hi <= 1 else 1.0)
        image = image.point(lambda v: v * scale).convert("L")
    elif image.mode == "La":  # premultiplied alpha: PIL converts it only via LA
        image = image.convert("LA")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise InputError(f"cannot convert a {image.mode!r} image to RGB: {e}") from None


def mean_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    r, g, b = (int(m * 255) for m in mean)
    return r, g, b


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of its longer side (LLaVA's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_preprocess(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """CLIP's processing: bicubic resize of the shortest side to `size` (longer side
    truncated like transformers), centre crop `size`×`size`, scale 1/255, normalise.
    Returns [3, size, size] float32."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (left, top, new_w, new_h) != (0, 0, size, size):
        image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    # Scale in float64 then normalise in float32, as transformers' processor does.
    x = (pixels.permute(2, 0, 1).double() * (1 / 255)).float()
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def select_best_resolution(
    size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The (width, height) pinpoint that keeps the most image resolution, then wastes the
    least canvas; ties go to the first in list order (the original's rule)."""
    width, height = size
    best, best_effective, best_waste = pinpoints[0], -1, math.inf
    for pw, ph in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (pw, ph), effective, waste
    return best


def grid_shape(
    size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile: int
) -> tuple[int, int]:
    """(columns, rows) of tiles the anyres grid cuts an image of `size` into."""
    w, h = select_best_resolution(size, pinpoints)
    return w // tile, h // tile


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio to fit `target` and centre it on black."""
    w, h = image.size
    tw, th = target
    sw, sh = tw / w, th / h
    if sw < sh:
        new_w, new_h = tw, min(math.ceil(h * sw), th)
    else:
        new_w, new_h = min(math.ceil(w * sh), tw), th
    resized = image.resize((new_w, new_h), resample=BICUBIC)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


def unpad_slices(size: tuple[int, int], rows: int, cols: int) -> tuple[slice, slice]:
    """(row slice, column slice) of a rows×cols feature map that remain after removing
    the padding anyres added around an image of `size` (the original's rounding)."""
    width, height = size
    if width / height > cols / rows:
        new_rows = int(height * (cols / width))
        pad = (rows - new_rows) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new_cols = int(width * (rows / height))
    pad = (cols - new_cols) // 2
    return slice(0, rows), slice(pad, cols - pad)


@dataclass(frozen=True)
class ImageProcessor:
    """Turns a PIL image into the tensor a LLaVA model takes: [3, S, S] for "pad" and
    "square", [1 + tiles, 3, S, S] for "anyres" (the whole image first)."""

    size: int = 336
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    aspect_ratio: str = "pad"
    grid_pinpoints: tuple[tuple[int, int], ...] = ()

    @classmethod
    def for_config(cls, config: LlavaConfig) -> ImageProcessor:
        return cls(
            size=config.vision.image_size,
            mean=config.image_mean,
            std=config.image_std,
            aspect_ratio=config.image_aspect_ratio,
            grid_pinpoints=config.image_grid_pinpoints,
        )

    def __call__(self, image: Image.Image) -> Tensor:
        image = to_rgb(image)
        if self.aspect_ratio == "anyres":
            return torch.stack([self._clip(t) for t in self.anyres_crops(image)])
        if self.aspect_ratio == "pad":
            image = expand_to_square(image, mean_colour(self.mean))
        return self._clip(image)

    def anyres_crops(self, image: Image.Image) -> list[Image.Image]:
        """The whole image as a square, then the grid's tiles row by row."""
        target = select_best_resolution(image.size, self.grid_pinpoints)
        padded = resize_and_pad(image, target)
        s = self.size
        tiles = [
            padded.crop((x, y, x + s, y + s))
            for y in range(0, target[1], s)
            for x in range(0, target[0], s)
        ]
        return [image.resize((s, s), resample=BICUBIC), *tiles]

    def _clip(self, image: Image.Image) -> Tensor:
        return clip_preprocess(image, self.size, self.mean, self.std)
