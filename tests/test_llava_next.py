"""LLaVA-NeXT (v1.6) "anyres": shortv against the original algorithm and transformers.

- pixels: shortv's ImageProcessor vs an independent re-implementation of the original's
  process_anyres_image (tests/reference.py) + transformers' CLIP processor;
- visual tokens (count and order) for `spatial_unpad`, `spatial` and `flat` vs the
  original's merge branch applied to features computed by transformers' tower + projector;
- whole-model logits vs transformers' LlavaNextForConditionalGeneration on the same
  weights, for shortv loaded from the transformers and from the original layout;
- the real v1.6 geometry (336-pixel tiles, 24×24 patches; 672×672 → 2928 tokens, docs/design.md §5);
- batches and several images per prompt vs one prompt at a time.

transformers differs from the original in two places (so parity is only asserted where
both agree, and that agreement is checked first): it reads pinpoints as (height, width),
which changes the tie-break for images no larger than one tile, and it rounds the
unpadded size with round(x, 7) before int().

Unusual configurations (pad + spatial_unpad, cls_patch + anyres) are at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import shortv
from shortv.image import ImageProcessor
from shortv.models.anyres import grid_shape, select_best_resolution, unpad_slices
from shortv.models.config import TextConfig, VisionConfig
from shortv.models.llava import LlavaModel
from shortv.token_types import TokenType

from . import checkpoints
from . import reference as ref
from .data import image
from .reference import hf_forward, hf_logits, hf_num_crops, hf_visual_count

PIXELS = dict(atol=1e-6, rtol=0)
FEATURES = dict(atol=1e-5, rtol=1e-5)
LOGITS = dict(atol=1e-4, rtol=1e-4)

# (width, height) for the tiny 28-pixel tower (2×2 patches per tile).
SIZES = {
    "wide": (60, 25),
    "tall": (25, 60),
    "near-square-wide": (58, 50),
    "near-square-tall": (50, 58),
    "wide-in-square-grid": (70, 40),
    "square": (40, 40),
    "square-large": (90, 90),
    "square-one-tile": (28, 28),
    "odd-unpad": (200, 40),
    "extreme-wide": (500, 20),
    "extreme-tall": (20, 500),
    "1x1": (1, 1),
    "3x200": (3, 200),
    "unpad-rounding": (49, 294),
}
# Sizes on which transformers and the original agree (checked by test_parity_sizes_agree).
PARITY = {
    "wide": [(60, 25)],
    "tall": [(25, 60)],
    "near-square-wide": [(58, 50)],
    "wide-in-square-grid": [(70, 40)],
    "large": [(200, 90)],
    "three-images": [(60, 25), (25, 60), (70, 40)],
}

REAL_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def pinpoints(model: shortv.LLaVA) -> list[tuple[int, int]]:
    return [tuple(p) for p in model.config.image_grid_pinpoints]


def visual_count(model: shortv.LLaVA, encoded: shortv.Encoded) -> int:
    return int((model.prepare([encoded]).types == TokenType.VISUAL).sum())


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_next(hf_llava_next: Path):
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(hf_llava_next, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def ours_original(original_v16: Path) -> shortv.LLaVA:
    return shortv.load(original_v16, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ours_transformers(hf_llava_next: Path) -> shortv.LLaVA:
    return shortv.load(hf_llava_next, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module", params=["transformers", "original"])
def ours(request, ours_transformers, ours_original) -> shortv.LLaVA:
    return ours_transformers if request.param == "transformers" else ours_original


def edited_original(src: Path, out: Path, *, drop_newline: bool, **config) -> Path:
    """A copy of an original-layout checkpoint with config.json fields changed, and
    `model.image_newline` removed (as the original saves a model without 'unpad')."""
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(config)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if drop_newline:
        state = load_file(str(out / "model.safetensors"))
        del state["model.image_newline"]
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", params=["flat", "spatial"])
def ours_merge(request, tmp_path_factory, original_v16: Path) -> shortv.LLaVA:
    out = tmp_path_factory.mktemp("merge") / request.param
    directory = edited_original(original_v16, out, drop_newline=True,
                                mm_patch_merge_type=request.param)
    model = shortv.load(directory, device="cpu", dtype=torch.float32)
    assert model.config.patch_merge_type == request.param
    return model


# ---- transformers as an oracle --------------------------------------------------------------


def hf_crop_features(hf, pixels: torch.Tensor) -> torch.Tensor:
    """[C, P, D]: transformers' tower (selected layer, CLS dropped) + projector per crop."""
    cfg = hf.config
    assert cfg.vision_feature_select_strategy == "default"
    with torch.no_grad():
        out = hf.model.vision_tower(pixels, output_hidden_states=True)
        hidden = out.hidden_states[cfg.vision_feature_layer][:, 1:]
        return hf.model.multi_modal_projector(hidden)


# ---- geometry ---------------------------------------------------------------------------------


def grid_sizes(limit: int, step: int):
    return [(w, h) for w in range(1, limit, step) for h in range(1, limit, step)]


@pytest.mark.parametrize(("tile", "points", "sizes"), [
    (28, [(28, 56), (56, 28), (56, 56), (84, 28), (28, 84)], grid_sizes(130, 3)),
    (336, list(REAL_PINPOINTS), [*grid_sizes(1400, 37), (376, 799), (47, 1128), (672, 672)]),
], ids=["tiny", "real"])
def test_geometry_matches_original(tile: int, points, sizes):
    """Pinpoint choice, grid shape and the unpadded feature-map shape for every size of a
    grid (degenerate sizes where the original finds no pinpoint are left out)."""
    side = tile // 14
    checked = 0
    for size in sizes:
        want = ref.select_best_resolution(size, points)
        if want is None:
            continue
        assert select_best_resolution(size, points) == want, size
        cols, rows = grid_shape(size, points, tile)
        assert (cols, rows) == ref.get_anyres_image_grid_shape(size, points, tile), size
        fmap = torch.zeros(1, rows * side, cols * side)
        want_shape = tuple(ref.unpad_image(fmap, size).shape[1:])
        rs, cs = unpad_slices(size, rows * side, cols * side)
        assert tuple(fmap[0, rs, cs].shape) == want_shape, size
        checked += 1
    assert checked > 0.9 * len(sizes)


@pytest.mark.parametrize("shape", list(SIZES))
def test_anyres_crops_and_pixels_match_original(shape: str, original_v16: Path):
    size = SIZES[shape]
    img = image(size)
    processor = ImageProcessor.for_config(shortv.loading.config_of_directory(original_v16))
    assert processor.aspect_ratio == "anyres" and processor.size == 28
    points = list(processor.grid_pinpoints)
    # The PIL crops, byte for byte.
    got_crops = processor.anyres_crops(img)
    want_crops = ref.anyres_crops(img, 28, points)
    assert [c.size for c in got_crops] == [c.size for c in want_crops]
    assert all(g.tobytes() == w.tobytes() for g, w in zip(got_crops, want_crops, strict=True))
    # The tensors.
    got = processor(img)
    want = ref.anyres_pixels(img, 28, points)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **PIXELS)


@pytest.mark.parametrize("size", [(672, 672), (336, 672), (1000, 300), (376, 799)])
def test_anyres_pixels_match_original_real_shapes(size):
    img = image(size)
    got = ImageProcessor(size=336, aspect_ratio="anyres", grid_pinpoints=REAL_PINPOINTS)(img)
    want = ref.anyres_pixels(img, 336, REAL_PINPOINTS)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **PIXELS)


# ---- visual tokens: count and order -------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SIZES))
def test_spatial_unpad_tokens_match_original(shape: str, ours_original: shortv.LLaVA, hf_next):
    """Count (through prepare) and every feature (through image_features) vs the
    original's merge of transformers-computed crop features."""
    model, size = ours_original, SIZES[shape]
    encoded = model.encode("look <image> here", [image(size)], template=False)
    pixels = encoded.images[0]
    points, tile = pinpoints(model), model.config.vision.image_size
    want = ref.merge_crops(hf_crop_features(hf_next, pixels), size, merge_type="spatial_unpad",
                           grid_pinpoints=points, tile=tile, side=tile // 14,
                           image_newline=hf_next.model.image_newline.detach())
    count = ref.num_visual_tokens(size, grid_pinpoints=points, tile=tile, patch=14)
    assert want.shape[0] == count
    assert visual_count(model, encoded) == count
    with torch.no_grad():
        got = model.module.image_features([pixels], [size])[0]
    torch.testing.assert_close(got, want, **FEATURES)


def test_unpad_rounding_follows_the_original(ours_original: shortv.LLaVA):
    """49×294 in a 1×3 grid: 49·(6/294) is 0.99999… in floats; the original's int() gives
    0 columns (only newlines remain), transformers' round(x, 7) would give 1."""
    size = SIZES["unpad-rounding"]
    assert ref.get_anyres_image_grid_shape(size, pinpoints(ours_original), 28) == (1, 3)
    x = size[0] * (6 / size[1])
    assert int(x) != int(round(x, 7))  # the size really exercises the rounding
    encoded = ours_original.encode("<image>", [image(size)], template=False)
    want = ref.num_visual_tokens(size, grid_pinpoints=pinpoints(ours_original), tile=28, patch=14)
    assert want == 4 + 6  # base + one newline per row, no tile features
    assert visual_count(ours_original, encoded) == want


def test_merge_types_flat_and_spatial_match_original(ours_merge: shortv.LLaVA, hf_next):
    model = ours_merge
    merge = model.config.patch_merge_type
    assert model.module.image_newline is None
    points, tile = pinpoints(model), model.config.vision.image_size
    for size in [SIZES[s] for s in ("wide", "tall", "square-large", "extreme-tall", "1x1")]:
        encoded = model.encode("a <image> b", [image(size)], template=False)
        pixels = encoded.images[0]
        want = ref.merge_crops(hf_crop_features(hf_next, pixels), size, merge_type=merge,
                               grid_pinpoints=points, tile=tile, side=tile // 14)
        count = ref.num_visual_tokens(size, grid_pinpoints=points, tile=tile, patch=14,
                                      merge_type=merge)
        assert want.shape[0] == count == pixels.shape[0] * (tile // 14) ** 2
        assert visual_count(model, encoded) == count
        with torch.no_grad():
            got = model.module.image_features([pixels], [size])[0]
        torch.testing.assert_close(got, want, **FEATURES)


def test_spatial_order_differs_from_flat(ours_merge: shortv.LLaVA, hf_next):
    """The two merges keep the same tokens in different orders (so the order test above
    can tell them apart): for a multi-row/column grid they must not be equal."""
    size = SIZES["square-large"]
    pixels = ours_merge.processor(image(size))
    feats = hf_crop_features(hf_next, pixels)
    kw = dict(grid_pinpoints=pinpoints(ours_merge), tile=28, side=2)
    flat = ref.merge_crops(feats, size, merge_type="flat", **kw)
    spatial = ref.merge_crops(feats, size, merge_type="spatial", **kw)
    assert flat.shape == spatial.shape and not torch.equal(flat, spatial)


# ---- the real v1.6 geometry -------------------------------------------------------------------


REAL_CASES = {"672x672": (672, 672), "336x672-tall": (336, 672), "1000x300": (1000, 300),
              "376x799-rounding": (376, 799)}


def real_reference_count(size) -> int:
    return ref.num_visual_tokens(size, grid_pinpoints=REAL_PINPOINTS, tile=336, patch=14)


def test_real_reference_gives_design_count():
    """docs/design.md §5: a 672×672 input gives 576 + 48·49 = 2928 visual tokens."""
    assert real_reference_count((672, 672)) == 576 + 48 * 49 == 2928


@pytest.fixture(scope="module")
def card_model_meta() -> shortv.LLaVA:
    """The real llava-v1.6-vicuna-7b architecture on the meta device (no weights)."""
    config = shortv.zoo.card("llava-v1.6-vicuna-7b").config
    assert config.image_aspect_ratio == "anyres" and config.patch_merge_type == "spatial_unpad"
    with torch.device("meta"):
        return shortv.LLaVA(LlavaModel(config))


@pytest.mark.parametrize("case", list(REAL_CASES))
def test_real_v16_visual_tokens_on_meta(case: str, card_model_meta: shortv.LLaVA):
    """prepare() needs data-dependent ops (nonzero) that meta tensors cannot do, so the
    count comes from image_features (real preprocessing, meta tower + projector + merge)."""
    size = REAL_CASES[case]
    model = card_model_meta
    pixels = model.processor(image(size))
    assert pixels.shape[1:] == (3, 336, 336)
    assert pixels.shape[0] == ref.num_crops(size, REAL_PINPOINTS, 336)
    feats = model.module.image_features([pixels], [size])[0]
    assert feats.shape == (real_reference_count(size), 4096)
    if size == (672, 672):
        assert feats.shape[0] == 2928


@pytest.fixture(scope="module")
def narrow_real_geometry() -> shortv.LLaVA:
    """The v1.6 card's image geometry (336 tiles, 14-pixel patches, its pinpoints) with a
    narrow random tower and decoder, so the whole prepare() path runs on CPU."""
    card = shortv.zoo.card("llava-v1.6-vicuna-7b").config
    config = card.replace(
        vision=VisionConfig(image_size=336, patch_size=14, width=16, layers=2, heads=2, mlp_dim=32),
        text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, layers=1, heads=2,
                        kv_heads=2, head_dim=8, max_position_embeddings=8192),
    )
    model = shortv.LLaVA(LlavaModel(config))
    checkpoints.randomize(model.module)
    return model


@pytest.mark.parametrize("case", list(REAL_CASES))
def test_real_v16_visual_tokens_through_prepare(case: str, narrow_real_geometry: shortv.LLaVA):
    size = REAL_CASES[case]
    model = narrow_real_geometry
    pixels = model.processor(image(size))
    encoded = shortv.Encoded(torch.tensor([1, 5, shortv.IMAGE_TOKEN, 7]), (pixels,), (size,))
    assert visual_count(model, encoded) == real_reference_count(size)


# ---- parity with transformers -------------------------------------------------------------------


def test_parity_sizes_agree(hf_next):
    """The parity sizes are ones where transformers' pinpoint choice, crop count and token
    count equal the original's."""
    points = [tuple(p) for p in hf_next.config.image_grid_pinpoints]
    for sizes in PARITY.values():
        for size in sizes:
            assert hf_num_crops(hf_next, size) == ref.num_crops(size, points, 28), size
            want = ref.num_visual_tokens(size, grid_pinpoints=points, tile=28, patch=14)
            assert hf_visual_count(hf_next, size) == want, size


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_match_transformers(case: str, ours: shortv.LLaVA, hf_next):
    sizes = PARITY[case]
    assert hf_next.config.vision_feature_select_strategy == "default"
    prompt = "USER: " + " and ".join("<image>" for _ in sizes) + "\nWhat is there? ASSISTANT:"
    encoded = ours.encode(prompt, [image(s) for s in sizes], template=False)
    counts = [hf_visual_count(hf_next, s) for s in sizes]
    assert visual_count(ours, encoded) == sum(counts)
    want = hf_logits(hf_next, encoded, counts)
    got = ours.logits(encoded)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **LOGITS)


def test_logits_depend_on_image_and_size(ours_original: shortv.LLaVA):
    """Guards the parity test against passing trivially: other pixels, or the same pixels
    with another original size (another unpadding), change the logits."""
    model = ours_original
    a = model.encode("<image> what?", [image((60, 25))], template=False)
    b = model.encode("<image> what?", [ref.random_rgb(60, 25, seed=1)], template=False)
    assert not torch.allclose(model.logits(a), model.logits(b), **LOGITS)
    c = shortv.Encoded(a.input_ids, a.images, ((84, 25),))  # same grid, no unpadding
    assert visual_count(model, c) != visual_count(model, a)


# ---- batches and several images ----------------------------------------------------------------


def test_batch_and_multi_image_prompts_equal_one_by_one(ours_original: shortv.LLaVA):
    model = ours_original
    batch = [
        model.encode("USER: <image>\nDescribe it. ASSISTANT:", [image((60, 25))], template=False),
        model.encode("<image> left, <image> right, which is bigger?",
                     [image((25, 60)), image((90, 90))], template=False),
        model.encode("USER: no picture here, just text. ASSISTANT:", template=False),
        model.encode("<image>", [image((500, 20))], template=False),
    ]
    with torch.inference_mode():
        prepared = model.prepare(batch)
        logits = model.module.decoder.head(model.hidden_states(prepared))
        assert len(set(prepared.lengths)) == len(batch)  # really padded
        for i, encoded in enumerate(batch):
            alone = model.logits(encoded)
            n = prepared.lengths[i]
            assert alone.shape[0] == n
            assert (prepared.types[i, :-n] == TokenType.PAD).all()
            torch.testing.assert_close(logits[i, -n:], alone, **FEATURES)
        # The two-image prompt's visual tokens are each image's own features, in order.
        two = batch[1]
        single = [model.module.image_features([im], [s])[0] for im, s in zip(two.images, two.image_sizes,
                                                                       strict=True)]
        n = prepared.lengths[1]
        visual = prepared.embeds[1, -n:][prepared.types[1, -n:] == TokenType.VISUAL]
        torch.testing.assert_close(visual, torch.cat(single), **FEATURES)


# ---- configurations the original handles in its own way --------------------------------------


def test_pad_with_spatial_unpad_loads_and_adds_no_newline(tmp_path: Path, original_v16: Path):
    directory = edited_original(original_v16, tmp_path / "pad-unpad", drop_newline=False,
                                image_aspect_ratio="pad")
    model = shortv.load(directory, device="cpu", dtype=torch.float32)
    encoded = model.encode("<image>", [image((60, 25))], template=False)
    assert visual_count(model, encoded) == 4  # one 2×2 crop, as the original's encode_images


def test_cls_patch_with_spatial_merge_is_a_clear_error(tmp_path: Path, original_v16: Path):
    directory = edited_original(original_v16, tmp_path / "cls", drop_newline=False,
                                mm_vision_select_feature="cls_patch")
    with pytest.raises(shortv.ShortVError):
        model = shortv.load(directory, device="cpu", dtype=torch.float32)
        model.prepare([model.encode("<image>", [image((60, 25))], template=False)])


def test_hook_points_equal_transformers_hidden_states(ours_transformers: shortv.LLaVA, hf_next):
    """The hook points on LLaVA-NeXT (anyres tiles, unpadding, row-end tokens): resid_pre[i]
    is transformers' hidden_states[i], resid_post[i] its hidden_states[i + 1] (the last
    after the final norm there), for a wide image."""
    size = SIZES["wide"]
    prompt = "USER: <image>\nWhat is there? ASSISTANT:"
    encoded = ours_transformers.encode(prompt, [image(size)], template=False)
    logits, cache = ours_transformers.run_with_cache(encoded, names=["resid_pre", "resid_post"])
    out = hf_forward(hf_next, encoded, [hf_visual_count(hf_next, size)], output_hidden_states=True)
    n = ours_transformers.num_layers
    for i in range(n):
        torch.testing.assert_close(cache["resid_pre", i][0], out.hidden_states[i][0], **FEATURES)
        post = cache["resid_post", i][0]
        if i == n - 1:
            post = ours_transformers.module.decoder.norm(post)
        torch.testing.assert_close(post, out.hidden_states[i + 1][0], **FEATURES)
    torch.testing.assert_close(logits, out.logits[0], **LOGITS)
