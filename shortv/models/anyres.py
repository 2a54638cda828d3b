"""LLaVA-NeXT's any-resolution ("anyres") grid: which grid of tiles an image is cut into,
and which part of the tiles' feature map is image rather than padding.

The image processor (`shortv.image.ImageProcessor`) cuts and pads the image by this grid;
the model (`shortv.models.llava.LlavaModel`) lays the tiles' features back out on it and
crops the padding away, so both read the same rules from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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
