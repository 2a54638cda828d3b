"""The Qwen2-VL / Qwen2.5-VL vision tower against transformers' own towers
(Qwen2VisionTransformerPretrainedModel, Qwen2_5_VisionTransformerPretrainedModel) on the
same random weights and patches, fp32, with tiny configs."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_window_index

from shortv.errors import InputError
from shortv.models.qwen_config import QWEN2_5_VL, QWEN2_VL, QwenVisionConfig
from shortv.models.qwen_vision import QwenVisionTower, layout, merged_tokens

DEPTH, WIDTH, HEADS, OUT = 4, 64, 4, 48
FULL_ATTENTION = (1, 3)
# Qwen2.5-VL windows are 4×4 merged tokens (8×8 patches). (1, 4, 6): one partial window;
# (1, 10, 12): 2×2 windows, cut short at the bottom and right; (1, 2, 2): a single merge
# unit; (2, 8, 16): two frames of two whole windows each.
GRIDS = [(1, 4, 6), (1, 10, 12), (1, 2, 2), (2, 8, 16)]


def _configs(variant: str) -> tuple[QwenVisionConfig, object, type]:
    """Our config, transformers' config and its tower class for one variant."""
    if variant == QWEN2_VL:
        theirs = Qwen2VLVisionConfig(depth=DEPTH, embed_dim=WIDTH, hidden_size=OUT, mlp_ratio=2,
                                     num_heads=HEADS, hidden_act="quick_gelu")
        ours = QwenVisionConfig(variant=variant, depth=DEPTH, width=WIDTH, heads=HEADS,
                                mlp_dim=2 * WIDTH, out_width=OUT, act="quick_gelu")
        return ours, theirs, Qwen2VisionTransformerPretrainedModel
    theirs = Qwen2_5_VLVisionConfig(depth=DEPTH, hidden_size=WIDTH, intermediate_size=96, num_heads=HEADS,
                                    out_hidden_size=OUT, hidden_act="silu", window_size=112,
                                    fullatt_block_indexes=list(FULL_ATTENTION))
    ours = QwenVisionConfig(variant=variant, depth=DEPTH, width=WIDTH, heads=HEADS, mlp_dim=96,
                            out_width=OUT, act="silu", window_size=112,
                            fullatt_block_indexes=FULL_ATTENTION)
    return ours, theirs, Qwen2_5_VisionTransformerPretrainedModel


def _randomise(model: torch.nn.Module) -> None:
    """Weights of a size that keeps activations O(1) through the blocks (transformers'
    0.02 init would make every output nearly zero and the comparison weak)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_(1 + 0.2 * noise if "norm" in name or "ln_q" in name else 0.2 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


@pytest.fixture(scope="module", params=[QWEN2_VL, QWEN2_5_VL])
def towers(request: pytest.FixtureRequest) -> tuple[QwenVisionTower, torch.nn.Module]:
    ours_config, theirs_config, cls = _configs(request.param)
    theirs_config._attn_implementation = "eager"
    theirs = cls(theirs_config).eval()
    _randomise(theirs)
    ours = QwenVisionTower(ours_config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same names, no renaming
    return ours, theirs


def _patches(grids: list[tuple[int, int, int]], seed: int = 1) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_matches_transformers(towers: tuple[QwenVisionTower, torch.nn.Module]) -> None:
    ours, theirs = towers
    patches = _patches(GRIDS)
    expected = theirs(patches, torch.tensor(GRIDS)).pooler_output
    got = ours(patches, GRIDS)
    assert got.shape == (sum(merged_tokens(g) for g in GRIDS), OUT) == expected.shape
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hidden_layers_match_transformers(towers: tuple[QwenVisionTower, torch.nn.Module]) -> None:
    """Hidden states come back in the patches' order; transformers' Qwen2.5-VL keeps them
    in its window order, so they are put back with its own window index."""
    ours, theirs = towers
    patches = _patches(GRIDS)
    out = theirs(patches, torch.tensor(GRIDS), output_hidden_states=True)
    tokens, hidden = ours(patches, GRIDS, hidden_layers=[0, 2, DEPTH])
    expected = [out.hidden_states[i] for i in (0, 2, DEPTH)]
    if ours.config.windowed:
        index, _ = get_vision_window_index(torch.tensor(GRIDS), 2, 112, 14)
        rows = (index[:, None] * 4 + torch.arange(4)).flatten()
        expected = [h[torch.argsort(rows)] for h in expected]
    torch.testing.assert_close(tokens, out.pooler_output, atol=1e-5, rtol=1e-5)
    for got, want in zip(hidden, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_one_image_equals_its_slice_of_a_batch(towers: tuple[QwenVisionTower, torch.nn.Module]) -> None:
    """Images do not see each other: each one alone gives its slice of the batched output."""
    ours, _ = towers
    patches = _patches(GRIDS)
    batched = ours(patches, GRIDS)
    start, token = 0, 0
    for grid in GRIDS:
        n = grid[0] * grid[1] * grid[2]
        alone = ours(patches[start:start + n], [grid])
        torch.testing.assert_close(alone, batched[token:token + merged_tokens(grid)], atol=1e-5, rtol=1e-5)
        start, token = start + n, token + merged_tokens(grid)


def test_window_layout_matches_transformers() -> None:
    """The window order and window lengths equal transformers' get_vision_window_index,
    also for sides that are exact multiples of the window and for several frames."""
    config, _, _ = _configs(QWEN2_5_VL)
    grids = [*GRIDS, (1, 16, 16), (3, 6, 18), (1, 34, 2)]
    plan = layout(grids, config, torch.device("cpu"))
    index, cu = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    assert torch.equal(plan.order, index)
    assert plan.windows == torch.diff(cu).tolist()
    assert plan.frames == [h * w for t, h, w in grids for _ in range(t)]


@pytest.mark.parametrize(("shape", "grids", "match"), [
    ((24, 1176), [(1, 4, 4)], "hold 16 patches but 24"),
    ((24, 100), [(1, 4, 6)], r"patches \[N, 1176\]"),
    ((24, 1176), [(1, 3, 8)], "multiples of spatial_merge_size"),
    ((24, 1176), [], "no image grids"),
])
def test_bad_inputs_are_input_errors(towers: tuple[QwenVisionTower, torch.nn.Module],
                                     shape: tuple[int, int], grids: list, match: str) -> None:
    ours, _ = towers
    with pytest.raises(InputError, match=match):
        ours(torch.zeros(shape), grids)
