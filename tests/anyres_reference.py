"""Original LLaVA-NeXT "anyres", re-implemented for the tests from the original code.

Source: haotian-liu/LLaVA at c121f04 (the v1.6 release code), `llava/mm_utils.py`
(select_best_resolution, resize_and_pad_image, divide_to_patches,
get_anyres_image_grid_shape, process_anyres_image) and `llava/model/llava_arch.py`
(unpad_image and the `mm_patch_merge_type` branch of prepare_inputs_labels_for_multimodal).
Nothing here imports shortv: the tests compare shortv against this.

Conventions are the original's: image sizes and pinpoints are (width, height); PIL's
`Image.resize` is called without a filter, as the original does (Pillow's default for RGB
is bicubic); the CLIP step is transformers' CLIPImageProcessor (PIL backend).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from . import oracles


def select_best_resolution(original_size, possible_resolutions):
    """(width, height) pinpoint: most effective resolution, then least waste; None when
    every pinpoint scales the image to zero pixels (the original then crashes)."""
    original_width, original_height = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width = int(original_width * scale)
        downscaled_height = int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height,
                                   original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution
            and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def resize_and_pad_image(image: Image.Image, target_resolution) -> Image.Image:
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    resized_image = image.resize((new_width, new_height))
    new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    paste_x = (target_width - new_width) // 2
    paste_y = (target_height - new_height) // 2
    new_image.paste(resized_image, (paste_x, paste_y))
    return new_image


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    patches = []
    width, height = image.size
    for i in range(0, height, patch_size):
        for j in range(0, width, patch_size):
            patches.append(image.crop((j, i, j + patch_size, i + patch_size)))
    return patches


def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size):
    """(columns, rows) of the tile grid."""
    width, height = select_best_resolution(image_size, grid_pinpoints)
    return width // patch_size, height // patch_size


def anyres_crops(image: Image.Image, size: int, grid_pinpoints) -> list[Image.Image]:
    """process_anyres_image up to the CLIP step: the whole image resized to size×size,
    then the tiles of the padded image, row by row."""
    best_resolution = select_best_resolution(image.size, grid_pinpoints)
    image_padded = resize_and_pad_image(image, best_resolution)
    patches = divide_to_patches(image_padded, size)
    image_original_resize = image.resize((size, size))
    return [image_original_resize, *patches]


def anyres_pixels(image: Image.Image, size: int, grid_pinpoints) -> torch.Tensor:
    """process_anyres_image: [1 + tiles, 3, size, size]."""
    processor = oracles.clip_processor(size)
    crops = anyres_crops(image, size, grid_pinpoints)
    return torch.stack([processor(c, return_tensors="pt")["pixel_values"][0] for c in crops])


def unpad_image(tensor: torch.Tensor, original_size) -> torch.Tensor:
    """tensor [C, H, W]; original_size (width, height)."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        return tensor[:, padding:current_height - padding, :]
    scale_factor = current_height / original_height
    new_width = int(original_width * scale_factor)
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding:current_width - padding]


def merge_crops(image_feature: torch.Tensor, image_size, *, merge_type: str, grid_pinpoints,
                tile: int, side: int, image_newline: torch.Tensor | None = None) -> torch.Tensor:
    """One image's projected crop features [C, P, D] → its visual tokens [N, D], as the
    original's `mm_patch_merge_type` branch does (image_aspect_ratio 'anyres')."""
    if merge_type == "flat":
        return image_feature.flatten(0, 1)
    assert merge_type.startswith("spatial"), merge_type
    if image_feature.shape[0] > 1:
        base_image_feature = image_feature[0]
        image_feature = image_feature[1:]
        height = width = side
        assert height * width == base_image_feature.shape[0]
        num_patch_width, num_patch_height = get_anyres_image_grid_shape(
            image_size, grid_pinpoints, tile)
        image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
        if "unpad" in merge_type:
            image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
            image_feature = image_feature.flatten(1, 2).flatten(2, 3)
            image_feature = unpad_image(image_feature, image_size)
            image_feature = torch.cat((
                image_feature,
                image_newline[:, None, None].expand(*image_feature.shape[:-1], 1),
            ), dim=-1)
            image_feature = image_feature.flatten(1, 2).transpose(0, 1)
        else:
            image_feature = image_feature.permute(0, 2, 1, 3, 4).contiguous()
            image_feature = image_feature.flatten(0, 3)
        return torch.cat((base_image_feature, image_feature), dim=0)
    image_feature = image_feature[0]
    if "unpad" in merge_type:
        image_feature = torch.cat((image_feature, image_newline[None]), dim=0)
    return image_feature


def num_crops(image_size, grid_pinpoints, tile: int) -> int:
    """1 (the base) + the tiles divide_to_patches cuts from the padded image."""
    width, height = select_best_resolution(image_size, grid_pinpoints)
    return 1 + math.ceil(height / tile) * math.ceil(width / tile)


def num_visual_tokens(image_size, *, grid_pinpoints, tile: int, patch: int,
                      merge_type: str = "spatial_unpad") -> int:
    """Visual tokens of one image: merge_crops on zero features of the right shape."""
    side = tile // patch
    crops = num_crops(image_size, grid_pinpoints, tile)
    feats = torch.zeros(crops, side * side, 1)
    newline = torch.zeros(1)
    return merge_crops(feats, image_size, merge_type=merge_type, grid_pinpoints=grid_pinpoints,
                       tile=tile, side=side, image_newline=newline).shape[0]
