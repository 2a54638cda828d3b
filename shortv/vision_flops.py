"""Analytic FLOPs of the vision side: the tower and the projector (merger) that turn an
image into visual tokens, for both families.

The convention is `shortv.flops`'s (that of `torch.utils.flop_counter.FlopCounterMode`):
2 FLOPs per multiply-add, matrix multiplications only. Counted:

- the patch embedding (a matmul over the flattened patches for Qwen, a convolution with
  kernel = stride = one patch for CLIP: the same multiply-adds),
- per block: the Q, K, V and output projections (Qwen's fused qkv is the three of them),
  the attention scores Q·Kᵀ and the weighted sum of values, 2 · heads · head_dim
  multiply-adds per (query, key) pair, and the MLP (fc1 / fc2, or Qwen2.5-VL's gate, up
  and down),
- the projector: Qwen's merger (two Linears on each 2×2 block of patches) or LLaVA's
  (its 1 .. N Linears on each selected patch feature).

Not counted: biases, norms, activations, rotary embeddings, softmax, position and class
embeddings, residual additions, the window reordering and the crops' merging.

Attention pairs are counted within each attention segment, as the towers run them: a
Qwen image frame for full-attention blocks (images never see each other), a 112-pixel
window for Qwen2.5-VL's windowed blocks, the windows at the bottom and right edges at
their real (cut-short) sizes; a whole crop (class token + patches) for CLIP. Nothing is
charged across segments.

How this compares with torch's counter (tests/test_qwen_flops.py checks it to the
integer): FlopCounterMode has formulas for SDPA's fused CUDA kernels only (flash,
memory-efficient, cuDNN: 4 · heads · L_q · L_k · head_dim, the same as here; read from
torch's source, not run on a GPU by the tests). On the
CPU, `F.scaled_dot_product_attention` runs `_scaled_dot_product_flash_attention_for_cpu`
(3-D inputs too: they are unsqueezed to 4-D first), which has none, so the counter sees
no attention FLOPs at all there and reports less by exactly the attention terms. The
totals here include them: they equal the counter's total on the math SDPA backend
(`sdpa_kernel(SDPBackend.MATH)`, whose bmm's it counts), as the tests run it.

Not included: the decoder (`shortv.flops`), and the extra arithmetic of a method that
reduces images (VisionZip's class-token attention and its merging).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from .errors import InputError
from .models.anyres import grid_shape
from .models.config import LlavaConfig, projector_depth
from .models.qwen_config import QWEN2_VL, QwenVisionConfig, QwenVLConfig
from .qwen_image import smart_resize

GIGA = 1e9

Grid = tuple[int, int, int]


# ---- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------


def qwen_vision_flops(config: QwenVisionConfig, grids: Sequence[Sequence[int]]) -> int:
    """FLOPs of the Qwen2-VL / Qwen2.5-VL tower and its patch merger for images of `grids`
    (t, h, w in patches each, as `image_grid_thw`), all in one forward pass (images do not
    attend to each other, so the total is the sum of the images' own)."""
    checked = _qwen_grids(config, grids)
    w = config.width
    patches = sum(t * h * ww for t, h, ww in checked)
    full_pairs = sum(t * (h * ww) ** 2 for t, h, ww in checked)
    window_pairs = sum(_window_pairs(config, grid) for grid in checked) if config.windowed else full_pairs
    full_blocks = len(set(config.fullatt_block_indexes)) if config.windowed else config.depth
    attention_pairs = full_blocks * full_pairs + (config.depth - full_blocks) * window_pairs

    mlp_matrices = 2 if config.variant == QWEN2_VL else 3  # fc1, fc2 | gate, up, down
    per_patch_block = 4 * w * w + mlp_matrices * w * config.mlp_dim  # qkv (3 W²) + proj (W²) + MLP
    macs = (
        patches * config.patch_dim * w  # patch embedding
        + config.depth * patches * per_patch_block
        + 2 * attention_pairs * w  # Q·Kᵀ and the weighted sum, heads · head_dim = width
        # the merger: (patches / unit) merged tokens, each (unit·W) → (unit·W) → out
        + patches * w * (config.merge_unit * w + config.out_width)
    )
    return 2 * macs


def _window_pairs(config: QwenVisionConfig, grid: Grid) -> int:
    """Σ over Qwen2.5-VL's windows of one image of (window length in patches)²: each
    frame is cut into windows of `side` × `side` merged tokens, row-major, those at the
    bottom and right edges shorter; a window of a × b merged tokens holds a·b·unit patches."""
    t, h, w = grid
    m = config.spatial_merge_size
    side = config.window_size // config.factor  # merged tokens per window side
    rows, cols = _cuts(h // m, side), _cuts(w // m, side)
    return t * config.merge_unit**2 * sum(a * a for a in rows) * sum(b * b for b in cols)


def _cuts(n: int, side: int) -> list[int]:
    """Lengths of the runs a line of n merged tokens is cut into by windows of `side`."""
    return [side] * (n // side) + ([n % side] if n % side else [])


def _qwen_grids(config: QwenVisionConfig, grids: Sequence[Sequence[int]]) -> list[Grid]:
    """The grids as (t, h, w) int triples, after checking what the tower would refuse."""
    checked = []
    m = config.spatial_merge_size
    for grid in grids:
        try:
            values = tuple(operator.index(v) for v in grid)
        except TypeError:
            values = ()
        if len(values) != 3 or min(values) < 1 or values[1] % m or values[2] % m:
            raise InputError(f"image grid {tuple(grid)!r} is not (t, h, w) in patches, positive "
                             f"integers with h and w multiples of spatial_merge_size={m}")
        checked.append((values[0], values[1], values[2]))
    return checked


def qwen_image_grid(config: QwenVLConfig, width: int, height: int) -> Grid:
    """The (t, h, w) patch grid of a still image of width × height pixels, as the image
    processor resizes it (`shortv.qwen_image.smart_resize` with the config's pixel bounds)."""
    v, p = config.vision, config.preprocess
    h, w = smart_resize(height, width, v.factor, p.min_pixels, p.max_pixels)
    return 1, h // v.patch_size, w // v.patch_size


# ---- LLaVA (CLIP + projector) -----------------------------------------------------------


def clip_tower_flops(config: LlavaConfig, crops: int = 1) -> int:
    """FLOPs of LLaVA's CLIP tower (the layers it runs: up to the deepest selected hidden
    state) and its projector, for `crops` square crops of image_size pixels (1 per image
    for "pad" / "square", 1 + tiles for anyres: `llava_image_crops`)."""
    if isinstance(crops, bool) or not hasattr(crops, "__index__") or crops < 0:
        raise InputError(f"crops={crops!r} must be a non-negative integer number of image crops")
    v = config.vision
    w, patches = v.width, v.num_patches
    tokens = patches + 1  # the class token
    embed = patches * w * v.channels * v.patch_size**2
    layer = tokens * (4 * w * w + 2 * w * v.mlp_dim) + 2 * tokens * tokens * w
    projected = patches if config.vision_select_feature == "patch" else tokens
    d = config.text.hidden_size
    projector = projected * (config.vision_feature_size * d + (projector_depth(config.projector) - 1) * d * d)
    return 2 * operator.index(crops) * (embed + config.vision_depth * layer + projector)


def llava_image_crops(config: LlavaConfig, width: int, height: int) -> int:
    """Crops the tower sees for one image of width × height pixels: 1, or for anyres
    the whole image plus the tiles of its grid."""
    if config.image_aspect_ratio != "anyres":
        return 1
    cols, rows = grid_shape((width, height), config.image_grid_pinpoints, config.vision.image_size)
    return 1 + cols * rows


# ---- either family --------------------------------------------------------------------------


def image_flops(config: LlavaConfig | QwenVLConfig, sizes: Sequence[tuple[int, int]]) -> int:
    """Vision FLOPs (tower + projector / merger) of images of `sizes` ((width, height)
    pixels each) for a LLaVA or Qwen2-VL model's config."""
    if isinstance(config, QwenVLConfig):
        return qwen_vision_flops(config.vision, [qwen_image_grid(config, w, h) for w, h in sizes])
    if isinstance(config, LlavaConfig):
        return sum(clip_tower_flops(config, llava_image_crops(config, w, h)) for w, h in sizes)
    raise InputError(f"no vision FLOPs for a {type(config).__name__}; expected a LlavaConfig "
                     "or a QwenVLConfig")
