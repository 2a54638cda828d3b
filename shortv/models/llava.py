"""LLaVA's weights and forward passes: vision tower → projector → image features spliced
into the text → decoder.

`LlavaModel` is the torch module: it holds the weights and runs them; the method (ShortV,
FastV, ...) is an argument of every pass that depends on it, never state. Beside the
embeddings the assembly produces the token-type tensor (text / visual / padding) that
every decoder layer receives. The user-facing model (tokenizer, template, the current
method, `chat`, ...) is `shortv.llava.LLaVA`, which drives this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..methods import VANILLA, ImageView, Method
from ..ops import Linear
from .anyres import grid_shape, unpad_slices
from .assembly import Run, VisionLanguageModule
from .clip import CLIPVisionTower
from .config import LlavaConfig, projector_depth
from .llama import Decoder
from .protocols import LanguageModel, VisionTower
from .taps import Taps


class Projector(nn.Sequential):
    """'linear' or 'mlpNx_gelu': Linear, then (GELU, Linear) × (N - 1)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, bias: bool = True) -> None:
        layers: list[nn.Module] = [Linear(in_dim, out_dim, bias=bias)]
        for _ in range(projector_depth(kind) - 1):
            layers += [nn.GELU(), Linear(out_dim, out_dim, bias=bias)]
        super().__init__(*layers)


class LlavaModel(VisionLanguageModule):
    """The modules of a LLaVA-1.5 / LLaVA-NeXT model and its forward passes, with ShortV
    and the token-reduction methods built in (each pass takes the method to run).

    Its parts follow `shortv.models.protocols`: a CLIP `VisionTower`, a Llama
    `LanguageModel`, and the model itself is LLaVA's `Assembler` (`prepare`)."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision: VisionTower = CLIPVisionTower(config.vision, depth=config.vision_depth)
        self.projector = Projector(
            config.projector, config.vision_feature_size, config.text.hidden_size,
            bias=config.projector_bias,
        )
        if config.uses_image_newline:
            self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))
        else:
            self.image_newline = None
        self.decoder: LanguageModel = Decoder(config.text)
        self.eval()

    # ---- images → visual tokens ----------------------------------------------------------

    def image_features(
        self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], *, method: Method = VANILLA,
        taps: Taps | None = None,
    ) -> list[Tensor]:
        """Visual tokens [N_i, D] per image; all crops of all images in one tower call,
        after `method`'s image reduction (VisionZip), if it has one; `taps` fire at the
        tower's layers."""
        if not images:
            return []
        crops = [im if im.dim() == 4 else im[None] for im in images]
        pixels = torch.cat(crops).to(self.device, self.dtype)
        counts = [c.shape[0] for c in crops]
        if method.reduces_images:
            return self._reduced_image_features(pixels, counts, sizes, method, taps)
        hidden = torch.cat(self.vision(pixels, self.config.vision_hidden_indices, taps=taps).hidden_states,
                           dim=-1)
        if self.config.vision_select_feature == "patch":
            hidden = hidden[:, 1:]
        features = self.projector(hidden).split(counts)
        return [self._merge_crops(f, size) for f, size in zip(features, sizes, strict=True)]

    @property
    def vision_depth(self) -> int:
        """The tower's layers: those up to the one LLaVA reads."""
        return len(self.vision.layers)

    def _reduced_image_features(self, pixels: Tensor, counts: list[int],
                                sizes: Sequence[tuple[int, int]], method: Method,
                                taps: Taps | None = None) -> list[Tensor]:
        """Visual tokens per image after the method's `reduce_image` (VisionZip), which
        sees each image's crops at the select layer with that layer's class-token
        attention and keys, and returns the image's tokens in their final order: for an
        anyres image whose tiles the model merges (spatial_unpad) it is told the tile grid
        (`ImageView.tile_grid`); nothing is unpadded and no row-end token is added (the
        reduced tokens no longer fill the feature map). An image whose every patch the
        method keeps (`Method.keeps_image`: a full budget) is vanilla's tokens."""
        if self.config.vision_select_feature != "patch" or len(self.config.vision_hidden_indices) != 1:
            raise InputError(f"{method.describe()} needs a tower read at one layer without the "
                             "class token (select_feature 'patch')")
        tower = self.vision(pixels, self.config.vision_hidden_indices, class_attention=True, taps=taps)
        if tower.attention is None or tower.keys is None:
            raise InputError(f"{method.describe()} needs a tower read at a layer's output, not at "
                             "its embeddings (vision_select_layer 0)")
        (hidden,) = tower.hidden_states
        cls_attention, keys = tower.attention[..., 1:], tower.keys[:, :, 1:]
        out = []
        for h, a, k, size in zip(hidden.split(counts), cls_attention.split(counts), keys.split(counts),
                                 sizes, strict=True):
            patches = h[:, 1:]
            if method.keeps_image(patches.shape[0] * patches.shape[1]):
                out.append(self._merge_crops(self.projector(patches), size))
                continue
            view = ImageView(patches, a, k, cls_features=h[:, 0],
                             tile_grid=self._merged_tile_grid(patches.shape[0], size))
            out.append(self.projector(method.reduce_image(view)).flatten(0, 1))
        return out

    def _merged_tile_grid(self, crops: int, size: tuple[int, int]) -> tuple[int, int] | None:
        """(rows, cols) of an anyres image's tiles where `_merge_crops` would merge them into
        one unpadded feature map (spatial_unpad, a base image and tiles); None elsewhere."""
        c = self.config
        if c.image_aspect_ratio != "anyres" or c.patch_merge_type != "spatial_unpad" or crops == 1:
            return None
        return self._tile_grid(crops - 1, size)

    def _tile_grid(self, tiles: int, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the anyres grid of an image of `size`; InputError unless its
        `tiles` fill it."""
        c = self.config
        cols, rows = grid_shape(size, c.image_grid_pinpoints, c.vision.image_size)
        if tiles != rows * cols:
            raise InputError(
                f"image of size {size} was cut into {tiles} tiles but the grid needs "
                f"{rows}x{cols}; preprocess it with this model's encode()"
            )
        return rows, cols

    def _merge_crops(self, feats: Tensor, size: tuple[int, int]) -> Tensor:
        """One image's crop features [C, P, D] as a token sequence, the original's way."""
        c = self.config
        # The original merges crops only for anyres; "pad"/"square" images are one crop.
        if c.patch_merge_type == "flat" or c.image_aspect_ratio != "anyres":
            return feats.flatten(0, 1)
        unpad = c.patch_merge_type == "spatial_unpad"
        if feats.shape[0] == 1:
            return torch.cat((feats[0], self.image_newline[None])) if unpad else feats[0]
        side = c.vision.patches_per_side
        base, tiles = feats[0], feats[1:]
        rows, cols = self._tile_grid(tiles.shape[0], size)
        grid = tiles.view(rows, cols, side, side, -1)
        if not unpad:
            return torch.cat((base, grid.permute(0, 2, 1, 3, 4).flatten(0, 3)))
        # One feature map [rows*side, cols*side, D], cropped back to the image's aspect,
        # with image_newline closing every row.
        fmap = grid.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)
        row_slice, col_slice = unpad_slices(size, rows * side, cols * side)
        fmap = fmap[row_slice, col_slice]
        newline = self.image_newline.expand(fmap.shape[0], 1, -1)
        return torch.cat((base, torch.cat((fmap, newline), dim=1).flatten(0, 1)))

    # ---- assembly --------------------------------------------------------------------------

    def positions(self, runs: Sequence[Run], features: Sequence[Tensor]) -> Tensor:
        """1-D RoPE: every token, visual ones included, one position after the last."""
        return torch.arange(sum(r.length for r in runs), device=self.device)
