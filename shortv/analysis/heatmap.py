"""Per-visual-token scores drawn over the picture: each token's score painted on the pixels
its patch sees (`VisionLanguageModel.visual_boxes`: LLaVA's pad, square and anyres layouts,
Qwen's merged grid), averaged where boxes overlap (LLaVA-NeXT's base image and tiles)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from ..errors import InputError
from ..models.batch import Encoded
from ..session import VisionLanguageModel, image_list, to_pil


def token_map(model: VisionLanguageModel, encoded: Encoded, scores: Tensor) -> list[Tensor]:
    """Per image of `encoded`, a [height, width] float map of `scores` (one per visual
    token of the prepared sequence, images in order) in the image's original pixels; NaN
    where no token's box lies."""
    if model.method.reduces_images:
        raise InputError(f"{model.method.describe()} changes the images' tokens; draw maps with a method "
                         "that keeps them (model.set_method(shortv.Vanilla()))")
    boxes = model.visual_boxes(encoded)
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
    expected = sum(b.shape[0] for b in boxes)
    if scores.numel() != expected:
        raise InputError(f"{scores.numel()} scores for {expected} visual tokens; give one score per "
                         "visual token of the input, in order (cache.of_type(..., TokenType.VISUAL) rows)")
    maps, start = [], 0
    for (w, h), image_boxes in zip(encoded.image_sizes, boxes, strict=True):
        total = torch.zeros(h, w, dtype=torch.float64)
        count = torch.zeros(h, w, dtype=torch.float64)
        for box, score in zip(image_boxes, scores[start:start + image_boxes.shape[0]], strict=True):
            if bool(box.isnan().any()):
                continue  # a row-end token: no region of the picture
            x0, y0, x1, y1 = (round(float(v)) for v in box)
            total[y0:y1, x0:x1] += score
            count[y0:y1, x0:x1] += 1
        start += image_boxes.shape[0]
        maps.append(torch.where(count > 0, total / count.clamp(min=1), torch.nan))
    return maps


def heatmap(model: VisionLanguageModel, encoded: Encoded, scores: Tensor,
            images: object = None, *, alpha: float = 0.6) -> list[Image.Image]:
    """`scores` (one per visual token, e.g. attention from a query, LC per token, the tokens a
    method keeps) drawn over each image of `encoded`: `images` are the original pictures
    (any form `encode` takes), or None for a grey canvas of their sizes. The scores are
    scaled to [0, 1] over their range and shown in a dark-red-to-yellow ramp at opacity
    `alpha`. One PIL image per image."""
    maps = token_map(model, encoded, scores)
    pictures: Sequence[object] = image_list(images) if images is not None else [None] * len(maps)
    if len(pictures) != len(maps):
        raise InputError(f"{len(pictures)} images given for an input of {len(maps)}")
    finite = torch.cat([m[~m.isnan()] for m in maps]) if maps else torch.zeros(0)
    low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    out = []
    for heat, picture in zip(maps, pictures, strict=True):
        h, w = heat.shape
        grey = Image.new("RGB", (w, h), (128, 128, 128))
        base = to_pil(picture).convert("RGB") if picture is not None else grey
        if base.size != (w, h):
            raise InputError(f"the image given is {base.size[0]}x{base.size[1]}; the input's is {w}x{h}")
        level = ((heat - low) / (high - low if high > low else 1.0)).nan_to_num(0.0).clamp(0, 1)
        colour = torch.stack((0.35 + 0.65 * level.clamp(max=0.5) * 2, (level - 0.5).clamp(min=0) * 2,
                              torch.zeros_like(level)), dim=-1)
        shown = (~heat.isnan()).double()[..., None] * alpha
        pixels = torch.frombuffer(bytearray(base.tobytes()), dtype=torch.uint8).view(h, w, 3).double() / 255
        blended = pixels * (1 - shown) + colour * shown
        out.append(Image.fromarray((blended * 255).round().byte().numpy(), "RGB"))
    return out
