"""Inputs and published numbers shared by several test files: the paper's FLOPs table
(typed in), the demo's pictures and prompts, noise images by size, held-out demo scenes."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from shortv.methods import VTW, FastV, ShortV, Vanilla

from .reference import random_rgb

REPO = Path(__file__).resolve().parents[1]


# ---- the paper ---------------------------------------------------------------------------------

# Paper rankings (docs/design.md §7); the first N are frozen.
RANKINGS = {
    "llava-v1.5-7b": (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19),
    "llava-v1.5-13b": (39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35,
                       22, 24, 21, 20, 17),
    "llava-v1.6-vicuna-7b": (31, 29, 30, 28, 26, 27, 22, 24, 21, 23, 25, 20, 19, 17, 18, 15, 12,
                             0, 2),
    "llava-v1.6-vicuna-13b": (39, 32, 29, 36, 27, 30, 37, 23, 25, 31, 26, 2, 28, 22, 33, 35, 34,
                              24, 38, 21, 20, 18, 1, 17),
}

# The paper's table (docs/design.md §8), typed in: the oracle. (model, method, TFLOPs, percent)
TABLE = [
    ("llava-v1.5-7b", Vanilla(), 8.5, 100),
    ("llava-v1.5-7b", FastV(k=2, r=0.5), 4.9, 58),
    ("llava-v1.5-7b", VTW(k=16), 4.7, 55),
    ("llava-v1.5-7b", ShortV(RANKINGS["llava-v1.5-7b"][:19]), 4.7, 55),
    ("llava-v1.5-13b", Vanilla(), 16.6, 100),
    ("llava-v1.5-13b", FastV(k=2, r=0.5), 9.4, 57),
    ("llava-v1.5-13b", VTW(k=20), 9.1, 55),
    ("llava-v1.5-13b", ShortV(RANKINGS["llava-v1.5-13b"][:24]), 9.1, 55),
    ("llava-v1.6-vicuna-7b", Vanilla(), 42.7, 100),
    ("llava-v1.6-vicuna-7b", FastV(k=2, r=0.5), 22.0, 52),
    ("llava-v1.6-vicuna-7b", VTW(k=16), 21.8, 51),
    ("llava-v1.6-vicuna-7b", ShortV(RANKINGS["llava-v1.6-vicuna-7b"][:19]), 21.6, 51),
    ("llava-v1.6-vicuna-13b", Vanilla(), 81.8, 100),
    ("llava-v1.6-vicuna-13b", FastV(k=2, r=0.5), 42.1, 51),
    ("llava-v1.6-vicuna-13b", VTW(k=20), 41.7, 51),
    ("llava-v1.6-vicuna-13b", ShortV(RANKINGS["llava-v1.6-vicuna-13b"][:24]), 41.0, 50),
]


# ---- pictures and prompts ----------------------------------------------------------------------

PROMPTS = [
    "What is in this picture?",
    "Describe the picture.",
    "What colour is the circle on the left of the picture? Answer in one word.",
    "What shapes do you see?",
]


def picture(i: int) -> Image.Image:
    """A small picture of coloured shapes, different for every i (the demo's world)."""
    colours = [(220, 30, 30), (30, 60, 220), (30, 170, 60), (240, 200, 20), (150, 40, 180)]
    image = Image.new("RGB", (64 + 8 * (i % 5), 48 + 6 * (i % 3)), (250, 250, 250) if i % 2 else (20, 20, 20))
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 8, 28, 32), fill=colours[i % 5])
    draw.rectangle((34, 10, 58, 34), fill=colours[(i // 5 + 2) % 5])
    return image


def image(size: tuple[int, int]) -> Image.Image:
    """A noise image of (width, height) `size`, the same for the same size."""
    return random_rgb(*size, seed=size[0] * 7919 + size[1])


def held_out(n: int, seed: int) -> list[tuple[Image.Image, str, str]]:
    """(image, question, answer) scenes the demo never trained on (scripts/make_demo.py)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import make_demo

    return make_demo.held_out(n, seed=seed)
