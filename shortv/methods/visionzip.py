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
first, get one more where it does not divide): VisionZip applies its per-crop setting to
every crop (the authors, VisionZip issue #17), so the paper's 640 / 320 / 160 for a
5-crop image are 128 / 64 / 32 per crop, i.e. `budget` 640 / 320 / 160 here. An image keeps
`min(budget, patches)` tokens (`image_tokens`). A budget of every patch (or more) keeps
the image as it is: its patches, in order, with no class token swapped in and nothing
merged (`keeps_image`; the code has no such setting: its dominant + contextual tokens
always include the class token and merged ones), so full budget is vanilla's output.
Ties in the class-token attention: the earlier patch first (the code's `topk` leaves them
unspecified).

LLaVA-NeXT layout (VisionZip's `restore_image_features_sorted`, used with
`spatial_unpad`): the base crop's tokens as above, then all tiles' dominant tokens put back
at their grid positions and read in raster order of the whole (rows·24) × (cols·24) tile
grid without unpadding or image_newline, then each tile's class token, then each tile's
contextual tokens, tile by tile. `reduce_image` returns the per-crop sequences and shortv's
LLaVA concatenates them in crop order: the same tokens and counts (hence FLOPs), in another
order, so LLaVA-NeXT outputs differ from VisionZip's own (a known limitation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Hook, ImageView, Method, check_int

# Published split: 10 contextual tokens out of 64 (also 20 / 128 and 30 / 192).
CONTEXTUAL_SHARE = 10 / 64
DEFAULT_BUDGET = 64  # the README's visionzip(model, dominant=54, contextual=10)


@dataclass(frozen=True)
class VisionZip(Method):
    """Keep `budget` visual tokens per image: dominant ones by class-token attention and
    contextual ones merged by key similarity (see the module docstring). None: 64."""

    budget: int | None = None
    name = "visionzip"
    hooks = frozenset({Hook.IMAGE})

    def __post_init__(self) -> None:
        if self.budget is not None:
            check_int(self.budget, "VisionZip budget", allowed="a positive number of visual tokens per image")

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
        crops, n, _ = features.shape
        cls = image.cls_features
        shares = crop_shares(self.tokens, crops)
        out = []
        for c in range(crops):
            out.append(zip_crop(features[c], image.cls_attention[c], image.keys[c],
                                None if cls is None else cls[c], min(shares[c], n)))
        if len({t.shape[0] for t in out}) == 1:
            return torch.stack(out)
        return torch.cat(out)[None]  # uneven shares: one row, crops in order

    def describe(self) -> str:
        return f"visionzip(budget={self.tokens})"


def crop_shares(budget: int, crops: int) -> list[int]:
    """An image's budget spread over its crops, the first ones taking the remainder."""
    return [budget // crops + (i < budget % crops) for i in range(crops)]


def split(tokens: int) -> tuple[int, int]:
    """(dominant, contextual) for `tokens` kept in one crop: 64 → (54, 10), 128 → (108,
    20), 192 → (162, 30)."""
    contextual = round(tokens * CONTEXTUAL_SHARE)
    return tokens - contextual, contextual


def zip_crop(features: Tensor, cls_attention: Tensor, keys: Tensor, cls: Tensor | None,
             tokens: int) -> Tensor:
    """One crop's `tokens` VisionZip tokens [tokens, width] from its patches [N, width],
    class-token attention [heads, N], keys [heads, N, head_dim] and optionally its class
    token's features [width]."""
    n = features.shape[0]
    if tokens >= n:
        # Full budget: every patch as it is, in order (no class token swapped in, no merge).
        return features
    dominant, contextual = split(tokens)
    patches = dominant - (cls is not None)
    score = cls_attention.float().sum(dim=0)
    order = score.argsort(descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=features.device)
    keep[order[:patches]] = True
    parts = [] if cls is None else [cls[None]]
    parts.append(features[keep])
    rest = (~keep).nonzero().flatten()
    if contextual > 0:
        parts.append(merge_contextual(features[rest], keys[:, rest], contextual))
    return torch.cat(parts).to(features.dtype)


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
