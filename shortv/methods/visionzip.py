"""VisionZip (Longer is Better but Not Necessary in Vision Language Models, CVPR 2025).

Before the language model, per crop, at the vision tower's select layer (the penultimate
layer for LLaVA; the layer whose output LLaVA reads):

1. **Dominant tokens**: the patches with the highest class-token attention in that layer,
   summed over heads (`image.cls_attention`, softmax over all 1 + N keys), kept as they are,
   in their spatial order.
2. **Contextual tokens**: the remaining patches, in spatial order, are compared by their
   keys in that layer, averaged over heads and L2-normalised (cosine similarity). Every
   `max(1, M // c)`-th of the M remaining patches (the first c of them) is a *target*; every
   other remaining patch is assigned to its most similar target (the first one on a tie), and
   each target becomes `target + mean(its assigned patches)` (just the target if none).
3. The crop's tokens are [dominant..., contextual...] (a class token first, see below).

Sources: dvlab-research/VisionZip `visionzip/clip_encoder.py`
(`CLIPVisionTower_VisionZip.forward`), `visionzip/utils.py` (`CLIPAttention_forward`
returns `raw_key_states.mean(1)`, the unscaled keys averaged over heads, as the metric; the
select layer is `layers[-2]`), `visionzip/main.py` (`visionzip(model, dominant, contextual)`
passes `dominant - 1` patches); read again in ModelTC/llmc
`llmc/compression/token_reduction/visionzip.py`.

Where the paper and the code differ we follow the code:

- A contextual token is `target + mean(assigned)`, not the average of the whole group
  (`contextual_tokens = target_hidden + aggregated_hidden` in the code).
- The class token is one of the "dominant" tokens: `dominant=54` keeps the class token's
  hidden state and the 53 best patches (the tower output is not passed through LLaVA's
  `feature_select`, so the class token reaches the projector). shortv's LLaVA passes the
  class token's hidden state (`ImageView.cls_features`) and it is kept first, as in the
  code; a view without it (hand-built) gives the slot to one more patch (llmc's reading,
  where LLaVA's `patch` selection drops it), so the token count is the same either way.

Budgets. The published splits are dominant / contextual = 54 / 10 (64 tokens), 108 / 20
(128), 162 / 30 (192) per crop (README, paper Table 1); all have contextual = 10/64 of the
tokens, so `budget` tokens split as contextual = round(budget · 5/32), dominant = the rest.
`budget` counts the visual tokens kept **per image**: LLaVA-1.5's 192 / 128 / 64. An anyres
(LLaVA-NeXT) image's budget is spread evenly over its crops (the first crops, base image
first, get one more where it does not divide), each crop's share split as above: VisionZip
applies its per-crop setting to every crop (the authors, VisionZip issue #17), so the
paper's 640 / 320 / 160 for a 5-crop image are 128 / 64 / 32 per crop (108 + 20, 54 + 10
and, by the rule above, 27 + 5; the class token is one of the dominant ones in every crop,
tiles included), i.e. `budget` 640 / 320 / 160 here. An image keeps `min(budget,
patches)` tokens (`image_tokens`). A share of 0 (a budget below the crop count) keeps
nothing of its crop, a share of 1 its class token only; a share under 4 has no contextual
token (the code divides by the contextual count, so it has no such setting). A budget of every
patch (or more) keeps the image as it is: its patches, in order, with no class token
swapped in and nothing merged (`keeps_image`; the code has no such setting: its dominant +
contextual tokens always include the class token and merged ones), so full budget is
vanilla's output (on LLaVA-NeXT with its unpadding and row-end tokens). Ties in the
class-token attention: the earlier patch first (the code's `topk` leaves them unspecified).

LLaVA-NeXT layout (`layout="authors"`, the default). VisionZip's
`prepare_inputs_labels_for_multimodal_visionzip` (`visionzip/llava_arch.py`) replaces
LLaVA's own. LLaVA (haotian-liu/LLaVA `llava_arch.py`, anyres with `spatial_unpad`) gives
an image the base crop's patches, then the tiles' patches as one (rows·24) × (cols·24)
feature map (tile r·cols + c covers rows r·24.. and columns c·24..), cropped back to the
image's aspect (unpadding) and read row by row with `image_newline` closing every row.
VisionZip's tower returns every crop (base image and tiles, one batch) as [class token,
dominant patches in patch order, contextual tokens], with `all_indices` = [0, the dominant
patches' indices + 1]; the projector runs on those tokens, and for an image of several
crops the image's visual tokens are, in this order:

1. the base crop's tokens as the tower returns them: class token, its dominant patches in
   patch order, its contextual tokens (no `image_newline`);
2. the tiles' dominant patches (`restore_image_features_sorted` with `cur_keep_idx`, the
   tiles' `all_indices`: sorted, the class token's 0 dropped, minus 1) put back at their
   places on the (rows·24) × (cols·24) grid of the tiles and read row by row over the
   whole grid, so one row of the map takes the dominant patches of every tile in that
   row; the grid is neither unpadded nor given `image_newline` tokens (the code builds
   them and leaves them unused);
3. the tiles' class tokens, tile by tile;
4. the tiles' contextual tokens, tile by tile, each tile's in its order.

An image of one crop keeps its tokens as the tower returns them (the code adds
`image_newline` after them with `spatial_unpad`; shortv does not, as LLaVA's processor
always cuts an anyres image into a base image and at least one tile). With `flat` the
code concatenates the crops in order; with `spatial` (no unpad) its anyres branch fails
(a 5-D permute of 3-D features), so shortv keeps the crop order there. shortv's LLaVA tells
`reduce_image` the tile grid (`ImageView.tile_grid`, rows × cols) where it merges tiles
(`spatial_unpad`, several crops), and the rule above applies with the tower's patches per
side for 24. It is written per tile, so it also covers crops whose shares differ (a budget
that does not divide; the code has one setting for all crops): each tile's dominant
patches on the grid, then every tile's class token (where its share keeps one), then
every tile's contextual tokens. A tile whose share covers all its patches puts them all on
the grid. `layout="crops"` instead concatenates each crop's tokens in crop order (what
shortv did before): the same tokens and counts, hence the same FLOPs, in another order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Hook, ImageView, Method, check_int

# Published split: 10 contextual tokens out of 64 (also 20 / 128 and 30 / 192).
CONTEXTUAL_SHARE = 10 / 64
DEFAULT_BUDGET = 64  # the README's visionzip(model, dominant=54, contextual=10)
# How an anyres image's reduced crops are ordered (module docstring, "LLaVA-NeXT layout").
LAYOUTS = ("authors", "crops")


@dataclass(frozen=True)
class VisionZip(Method):
    """Keep `budget` visual tokens per image: dominant ones by class-token attention and
    contextual ones merged by key similarity (see the module docstring). None: 64.

    layout: the order of a LLaVA-NeXT image's tokens, "authors" (VisionZip's own code: the
    tiles' dominant tokens back on the tile grid) or "crops" (each crop's tokens in crop
    order); the two differ only where the model merges tiles (`ImageView.tile_grid`)."""

    budget: int | None = None
    layout: str = "authors"
    name = "visionzip"
    hooks = frozenset({Hook.IMAGE})

    def __post_init__(self) -> None:
        if self.budget is not None:
            check_int(self.budget, "VisionZip budget", allowed="a positive number of visual tokens per image")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"VisionZip layout={self.layout!r} is not allowed; use one of "
                              f"{', '.join(LAYOUTS)}")

    @property
    def tokens(self) -> int:
        return DEFAULT_BUDGET if self.budget is None else self.budget

    @property
    def reduces_images(self) -> bool:
        return True

    def image_tokens(self, n_visual: int) -> int:
        return min(self.tokens, n_visual)

    def keeps_image(self, n_patches: int) -> bool:
        # A budget that covers every patch leaves nothing to select or merge.
        return self.tokens >= n_patches

    def reduce_image(self, image: ImageView) -> Tensor:
        features = image.features
        cls = image.cls_features
        shares = crop_shares(self.tokens, features.shape[0])
        crops = [zip_parts(features[c], image.cls_attention[c], image.keys[c],
                           None if cls is None else cls[c], share)
                 for c, share in enumerate(shares)]
        if self.layout == "authors" and image.tile_grid is not None:
            rows, cols = image.tile_grid
            return authors_layout(crops, rows, cols, patches_per_side(features.shape[1]))[None]
        return crops_layout(crops)

    def describe(self) -> str:
        layout = "" if self.layout == "authors" else f", layout={self.layout}"
        return f"visionzip(budget={self.tokens}{layout})"


def crop_shares(budget: int, crops: int) -> list[int]:
    """An image's budget spread over its crops, the first ones taking the remainder."""
    return [budget // crops + (i < budget % crops) for i in range(crops)]


def split(tokens: int) -> tuple[int, int]:
    """(dominant, contextual) for `tokens` kept in one crop: 64 → (54, 10), 128 → (108,
    20), 192 → (162, 30)."""
    contextual = round(tokens * CONTEXTUAL_SHARE)
    return tokens - contextual, contextual


@dataclass
class ZippedCrop:
    """One crop's VisionZip tokens by kind (rows of width W): its class token [0 or 1, W],
    its dominant patches [D, W] in patch order with their patch indices `positions` [D]
    (increasing), and its contextual tokens [C, W]."""

    cls: Tensor
    dominant: Tensor
    positions: Tensor
    contextual: Tensor

    def tokens(self) -> Tensor:
        """The crop's tokens as VisionZip's tower returns them: [class, dominant, contextual]."""
        return torch.cat((self.cls, self.dominant, self.contextual))


def zip_crop(features: Tensor, cls_attention: Tensor, keys: Tensor, cls: Tensor | None,
             tokens: int) -> Tensor:
    """One crop's `tokens` VisionZip tokens [tokens, width] from its patches [N, width],
    class-token attention [heads, N], keys [heads, N, head_dim] and optionally its class
    token's features [width]."""
    return zip_parts(features, cls_attention, keys, cls, tokens).tokens()


def zip_parts(features: Tensor, cls_attention: Tensor, keys: Tensor, cls: Tensor | None,
              tokens: int) -> ZippedCrop:
    """`zip_crop`'s tokens by kind, with the dominant patches' indices (for the grid layout)."""
    n = features.shape[0]
    every = torch.arange(n, device=features.device)
    if tokens >= n:
        # Full share: every patch as it is, in order (no class token swapped in, no merge).
        return ZippedCrop(features[:0], features, every, features[:0])
    dominant, contextual = split(tokens)
    # The class token takes one dominant slot; a share of 0 (a budget below the crop count)
    # keeps nothing of the crop, not even its class token.
    with_cls = cls is not None and dominant > 0
    patches = dominant - with_cls
    score = cls_attention.float().sum(dim=0)
    order = score.argsort(descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=features.device)
    keep[order[:patches]] = True
    rest = (~keep).nonzero().flatten()
    merged = (merge_contextual(features[rest], keys[:, rest], contextual) if contextual > 0
              else features[:0])
    return ZippedCrop(cls[None].to(features.dtype) if with_cls else features[:0], features[keep],
                      every[keep], merged)


def merge_contextual(features: Tensor, keys: Tensor, contextual: int) -> Tensor:
    """`contextual` tokens from the M remaining patches [M, width] (keys [heads, M, d]):
    uniform-stride targets, each plus the mean of the patches most similar to it."""
    m = features.shape[0]
    work = torch.promote_types(features.dtype, torch.float32)
    metric = keys.to(work).mean(dim=0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, m // contextual)
    targets = torch.arange(0, m, step, device=features.device)[:contextual]
    is_target = torch.zeros(m, dtype=torch.bool, device=features.device)
    is_target[targets] = True
    others = (~is_target).nonzero().flatten()
    similarity = metric[others] @ metric[targets].T  # [M - c, c]
    assign = similarity.argmax(dim=1)
    total = features.new_zeros(targets.numel(), features.shape[1], dtype=work)
    total.index_add_(0, assign, features[others].to(work))
    counts = torch.bincount(assign, minlength=targets.numel()).clamp(min=1)
    return (features[targets].to(work) + total / counts[:, None]).to(features.dtype)


# ---- the order of an image's reduced crops -------------------------------------------------


def crops_layout(crops: list[ZippedCrop]) -> Tensor:
    """Each crop's tokens, crops in order: [C, n, W] when all crops keep n tokens, else one
    row [1, T, W]."""
    out = [crop.tokens() for crop in crops]
    if len({t.shape[0] for t in out}) == 1:
        return torch.stack(out)
    return torch.cat(out)[None]  # uneven shares: one row, crops in order


def authors_layout(crops: list[ZippedCrop], rows: int, cols: int, side: int) -> Tensor:
    """An anyres image's tokens [T, W] in VisionZip's LLaVA-NeXT order: the base crop's
    tokens, the tiles' dominant patches on the tile grid (`grid_dominant`), the tiles' class
    tokens, then the tiles' contextual tokens, tile by tile."""
    base, tiles = crops[0], crops[1:]
    if len(tiles) != rows * cols:
        raise ValueError(f"{len(tiles)} tiles do not fill a {rows}x{cols} grid")
    return torch.cat([base.tokens(), grid_dominant(tiles, cols, side), *(t.cls for t in tiles),
                      *(t.contextual for t in tiles)])


def grid_dominant(tiles: list[ZippedCrop], cols: int, side: int) -> Tensor:
    """The tiles' dominant patches [D, W] read in raster order of the (rows·side) ×
    (cols·side) feature map the tiles form (tile r·cols + c covers rows r·side.. and
    columns c·side..), with no unpadding and no row-end tokens, as the authors' code does."""
    where = []
    for t, tile in enumerate(tiles):
        r, c = divmod(t, cols)
        y, x = tile.positions // side, tile.positions % side
        where.append((r * side + y) * (cols * side) + c * side + x)
    order = torch.cat(where).argsort()
    return torch.cat([tile.dominant for tile in tiles])[order]


def patches_per_side(n: int) -> int:
    """The side of a crop's square patch grid of `n` patches."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"a crop of {n} patches is not a square grid")
    return side
