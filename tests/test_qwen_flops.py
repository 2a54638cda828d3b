"""Analytic FLOPs against torch's FlopCounterMode, to the integer:

- the Qwen2-VL / Qwen2.5-VL tower + merger (`shortv.vision_flops.qwen_vision_flops`) on
  transformers' own towers (eager attention: its per-segment matmuls are counted) and on
  ours (SDPA on the math backend, whose matmuls the counter sees), for grids with several
  windows, windows cut short, two images and two frames;
- the whole vision side of a loaded tiny Qwen model (`image_flops`: the image processor's
  grids, the tower, the merger) on `model.prepare`;
- LLaVA's CLIP tower + projector (`clip_tower_flops`) on our LlavaModel's image features,
  for the select-layer / select-feature / projector / anyres variants;
- the decoder's count (`shortv.flops`) on the Qwen decoder's prefill (q/k/v biases:
  addmm, counted as its matmul; M-RoPE), vanilla and under token-dropping methods;
- on the CPU's default SDPA kernel the counter sees no attention at all (what the
  module docstring says; a tripwire for a torch that starts counting it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

import shortv
from shortv import VTW, FastV, ShortV, Vanilla
from shortv.errors import InputError
from shortv.flops import TERA, sequence_flops
from shortv.image import ImageProcessor
from shortv.methods import Method
from shortv.models.config import LlavaConfig, TextConfig, VisionConfig
from shortv.models.llava import LlavaModel
from shortv.models.qwen_config import QWEN2_5_VL, QWEN2_VL, QwenVisionConfig
from shortv.models.qwen_vision import QwenVisionTower
from shortv.vision_flops import (
    clip_tower_flops,
    image_flops,
    llava_image_crops,
    qwen_image_grid,
    qwen_vision_flops,
)

from .checkpoints import randomize
from .qwen_checkpoints import VARIANTS, build_model, save_transformers
from .reference import random_rgb

# 2.5's windows are 4×4 merged tokens (8×8 patches).
GRIDS = {
    "windows": [(1, 16, 16)],  # 2×2 whole windows
    "partial-windows": [(1, 10, 12)],  # 2×2 windows, the bottom and right ones cut short
    "two-images": [(1, 4, 6), (1, 18, 10)],  # one partial window; 3×2 windows of mixed sizes
    "two-frames": [(2, 8, 16)],  # two frames of two whole windows each
    "one-unit": [(1, 2, 2)],
}


def _configs(variant: str) -> tuple[QwenVisionConfig, object, type]:
    """Ours, transformers' and its tower class: 3 blocks (2.5: full attention in block 1
    only, so windowed and full blocks differ in number), width != out_width != mlp_dim."""
    if variant == QWEN2_VL:
        theirs = Qwen2VLVisionConfig(depth=3, embed_dim=32, hidden_size=40, mlp_ratio=3, num_heads=2,
                                     hidden_act="quick_gelu")
        ours = QwenVisionConfig(variant=variant, depth=3, width=32, heads=2, mlp_dim=96, out_width=40)
        return ours, theirs, Qwen2VisionTransformerPretrainedModel
    theirs = Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, intermediate_size=56, num_heads=2,
                                    out_hidden_size=40, hidden_act="silu", window_size=112,
                                    fullatt_block_indexes=[1])
    ours = QwenVisionConfig(variant=variant, depth=3, width=32, heads=2, mlp_dim=56, out_width=40,
                            act="silu", window_size=112, fullatt_block_indexes=(1,))
    return ours, theirs, Qwen2_5_VisionTransformerPretrainedModel


def _counted(run, *, math_sdpa: bool = True) -> FlopCounterMode:
    """The counter after `run()` (no grad; SDPA on its math backend unless told otherwise)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if math_sdpa:
            with sdpa_kernel(SDPBackend.MATH):
                run()
        else:
            run()
    return counter


@pytest.fixture(scope="module", params=[QWEN2_VL, QWEN2_5_VL])
def towers(request: pytest.FixtureRequest) -> tuple[QwenVisionConfig, QwenVisionTower, torch.nn.Module]:
    ours_config, theirs_config, cls = _configs(request.param)
    theirs_config._attn_implementation = "eager"
    theirs = cls(theirs_config).eval()
    ours = QwenVisionTower(ours_config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours_config, ours, theirs


def _patches(grids: list[tuple[int, int, int]]) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", GRIDS)
def test_qwen_tower_flops_equal_the_flop_counter(towers, case: str):
    config, ours, theirs = towers
    grids = GRIDS[case]
    patches = _patches(grids)
    theirs_count = _counted(lambda: theirs(patches, torch.tensor(grids)), math_sdpa=False)
    ours_count = _counted(lambda: ours(patches, grids))
    analytic = qwen_vision_flops(config, grids)
    assert analytic == theirs_count.get_total_flops() == ours_count.get_total_flops()
    # The attention terms are really in the count (transformers' eager bmm's).
    assert theirs_count.get_flop_counts()["Global"][torch.ops.aten.bmm] > 0


def test_windows_cost_less_than_full_attention(towers):
    """Not vacuous for 2.5: the same grid under full attention everywhere counts more."""
    config, _, _ = towers
    grids = GRIDS["partial-windows"]
    everywhere = dataclasses.replace(config, fullatt_block_indexes=tuple(range(config.depth)))
    if config.windowed:
        assert qwen_vision_flops(config, grids) < qwen_vision_flops(everywhere, grids)
    else:
        assert qwen_vision_flops(config, grids) == qwen_vision_flops(everywhere, grids)


def test_the_cpu_default_sdpa_kernel_is_not_counted(towers):
    """What the module docstring says: on the CPU's default SDPA kernel the counter sees
    every matmul but the attention's."""
    config, ours, _ = towers
    grids = GRIDS["two-images"]
    patches = _patches(grids)
    default = _counted(lambda: ours(patches, grids), math_sdpa=False).get_flop_counts()["Global"]
    math = _counted(lambda: ours(patches, grids)).get_flop_counts()["Global"]
    assert torch.ops.aten.bmm not in default and math[torch.ops.aten.bmm] > 0
    assert sum(default.values()) + math[torch.ops.aten.bmm] == qwen_vision_flops(config, grids)


@pytest.mark.parametrize("grid", [(1, 3, 4), (1, 4), (0, 2, 2), (1.0, 2, 2)])
def test_bad_grids_are_input_errors(grid):
    config, _, _ = _configs(QWEN2_VL)
    with pytest.raises(InputError, match="is not"):
        qwen_vision_flops(config, [grid])


# ---- a loaded tiny Qwen model: vision side and decoder -------------------------------------

SIZES = [(333, 97), (280, 170), (120, 200)]  # (width, height): resized, several windows in 2.5
PROMPT = "Describe the pictures in detail."
METHODS = {
    "vanilla": Vanilla(),
    "fastv": FastV(k=1, r=0.5),
    "vtw": VTW(k=2),
    "shortv": ShortV((1, 3)),
}


@pytest.fixture(scope="module", params=VARIANTS)
def qwen(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> shortv.QwenVL:
    root = tmp_path_factory.mktemp(request.param)
    save_transformers(build_model(request.param, root), root)
    return shortv.load(str(root), device="cpu", dtype="float32")


def _images() -> list:
    return [random_rgb(w, h, seed=i + 1) for i, (w, h) in enumerate(SIZES)]


def test_model_vision_flops_equal_the_flop_counter(qwen):
    """`image_flops` from the images' pixel sizes alone (smart_resize → grids → tower +
    merger) equals the counter on the model's whole image path."""
    encoded = qwen.encode(PROMPT, _images())
    grids = [tuple(int(v) for v in (im.shape[0], 2 * im.shape[1], 2 * im.shape[2])) for im in encoded.images]
    assert grids == [qwen_image_grid(qwen.config, w, h) for w, h in SIZES]
    measured = _counted(lambda: qwen.prepare([encoded])).get_total_flops()
    assert measured > 0
    assert image_flops(qwen.config, SIZES) == measured


@pytest.mark.parametrize("name", METHODS)
def test_qwen_decoder_flops_equal_the_flop_counter(qwen, name: str):
    """`shortv.flops` on the Qwen decoder's prefill, one sequence (no padding), the image
    path outside the counter; `model.flops` gives the same count."""
    method: Method = METHODS[name].for_layers(qwen.num_layers)
    qwen.set_method(method)
    try:
        encoded = qwen.encode(PROMPT, _images())
        with torch.inference_mode():
            prepared = qwen.prepare([encoded])
        measured = _counted(lambda: qwen.hidden_states(prepared)).get_total_flops()
        report = qwen.flops(encoded)
    finally:
        qwen.set_method(Vanilla())
    types = prepared.types[0]
    assert int((types == int(shortv.TokenType.VISUAL)).sum()) > 0
    assert sequence_flops(qwen.config.text, method, types) == measured
    assert report["tflops"] * TERA == pytest.approx(measured, rel=1e-12)


def test_dropping_methods_count_less(qwen):
    """Not vacuous: each method's measured count differs from vanilla's."""
    encoded = qwen.encode(PROMPT, _images())
    with torch.inference_mode():
        prepared = qwen.prepare([encoded])
    counts = {name: _counted(lambda m=m: qwen.hidden_states(prepared, method=m.for_layers(qwen.num_layers)))
              .get_total_flops() for name, m in METHODS.items()}
    assert all(counts[name] < counts["vanilla"] for name in METHODS if name != "vanilla")


# ---- LLaVA: CLIP tower + projector ----------------------------------------------------------

TEXT = TextConfig(vocab_size=64, hidden_size=48, intermediate_size=64, layers=2, heads=4, kv_heads=4,
                  head_dim=12)
CLIP = VisionConfig(image_size=42, patch_size=14, width=32, layers=4, heads=2, mlp_dim=80)
PINPOINTS = ((42, 84), (84, 42), (84, 84))
LLAVA = {
    "pad-penultimate": LlavaConfig(vision=CLIP, text=TEXT),
    "cls-two-layers-mlp3": LlavaConfig(vision=CLIP, text=TEXT, vision_select_layers=(-3, 1),
                                       vision_select_feature="cls_patch", projector="mlp3x_gelu"),
    "anyres-linear": LlavaConfig(vision=CLIP, text=TEXT, projector="linear", image_aspect_ratio="anyres",
                                 image_grid_pinpoints=PINPOINTS, patch_merge_type="spatial_unpad"),
}
LLAVA_SIZES = [(60, 30), (40, 40)]


@pytest.mark.parametrize("name", LLAVA)
def test_clip_tower_flops_equal_the_flop_counter(name: str):
    config = LLAVA[name]
    model = LlavaModel(config)
    randomize(model)
    processor = ImageProcessor.for_config(config)
    images = [processor(random_rgb(w, h, seed=i)) for i, (w, h) in enumerate(LLAVA_SIZES)]
    crops = [im.shape[0] if im.dim() == 4 else 1 for im in images]
    assert crops == [llava_image_crops(config, w, h) for w, h in LLAVA_SIZES]
    measured = _counted(lambda: model.image_features(images, LLAVA_SIZES)).get_total_flops()
    assert measured > 0
    assert clip_tower_flops(config, sum(crops)) == measured == image_flops(config, LLAVA_SIZES)


def test_anyres_images_count_their_tiles():
    config = LLAVA["anyres-linear"]
    assert llava_image_crops(config, 60, 30) == 3  # the whole image + a 2×1 grid of tiles
    assert clip_tower_flops(config, 3) == 3 * clip_tower_flops(config, 1)
