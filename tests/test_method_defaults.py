"""Method defaults on models they were not written for (issue 22, point 3).

- Depth: PDrop's stage layers and SparseVLM's pruning layers are the published 32-layer
  ones at the same fractions of the depth; a fitted method's fields name the layers.
- Full budget: every method at its "keep everything" end (FastV r=0, PDrop λ=1 or a budget
  of every token, DART / SparseVLM / VisionZip budgets of every token, ShortV with no
  layers, compositions of those) gives vanilla's logits, on a tiny LLaVA-1.5 and a tiny
  LLaVA-NeXT. The oracle is the vanilla model, not the method's code. (VTW has no budget:
  its k must be a layer of the model.)
- Impossible options: a ConfigError when the method is built, one line saying what is
  wrong and what is allowed; on the command line, one line and exit status 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import shortv
from shortv import DART, VTW, ConfigError, FastV, PDrop, ShortV, SparseVLM, Vanilla, VisionZip, compose

from .cli_runner import run_main

TOL = dict(atol=1e-5, rtol=0.0)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# ---- depth ----------------------------------------------------------------------------------

# Worked by hand from the definitions: PDrop's stages at L/4, L/2, 3L/4 (the README's "4
# stages" of 32 layers at 8, 16, 24); SparseVLM's (2, 6, 15) of 32 at l·L/32; halves round up.
PDROP_LAYERS = {32: (8, 16, 24), 40: (10, 20, 30), 8: (2, 4, 6), 6: (2, 3, 5), 4: (1, 2, 3)}
SPARSEVLM_LAYERS = {32: (2, 6, 15), 40: (3, 8, 19), 16: (1, 3, 8), 8: (1, 2, 4), 4: (0, 1, 2)}


@pytest.mark.parametrize("depth", sorted(PDROP_LAYERS))
def test_pdrop_default_layers_scale_with_depth(depth):
    fitted = PDrop().for_layers(depth)
    assert fitted.layers == PDROP_LAYERS[depth]
    assert str(PDROP_LAYERS[depth]) in fitted.describe()


@pytest.mark.parametrize("depth", sorted(SPARSEVLM_LAYERS))
def test_sparsevlm_default_layers_scale_with_depth(depth):
    fitted = SparseVLM().for_layers(depth)
    assert fitted.layers == SPARSEVLM_LAYERS[depth]
    assert str(SPARSEVLM_LAYERS[depth]) in fitted.describe()


def test_default_layers_fit_every_depth_from_4():
    """Distinct, increasing, within the layers a stage may use, and within half a layer of
    the published fraction of the depth."""
    for depth in range(4, 129):
        pdrop, sparse = PDrop().for_layers(depth).layers, SparseVLM().for_layers(depth).layers
        assert len(set(pdrop)) == 3 and list(pdrop) == sorted(pdrop) and 1 <= pdrop[0] and pdrop[-1] < depth
        assert all(abs(layer - f * depth / 4) <= 0.5 for layer, f in zip(pdrop, (1, 2, 3), strict=True))
        assert len(set(sparse)) == 3 and list(sparse) == sorted(sparse) and 0 <= sparse[0]
        assert sparse[-1] < depth - 1  # a layer after the last pruning layer to drop from
        assert all(abs(layer - f * depth / 32) <= 0.5 for layer, f in zip(sparse, (2, 6, 15), strict=True))


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("method", [PDrop(), SparseVLM()], ids=["pdrop", "sparsevlm"])
def test_default_layers_refuse_too_shallow_decoders(method, depth):
    with pytest.raises(ConfigError, match="at least 4 layers") as info:
        method.for_layers(depth)
    assert "\n" not in str(info.value)


def test_defaults_stay_constructible_and_say_what_they_mean():
    assert PDrop().layers is None and "L/4, L/2, 3L/4" in PDrop().describe()
    assert SparseVLM().layers is None and "scaled to the depth" in SparseVLM().describe()
    # explicit layers are kept as given on a deep enough model
    assert PDrop(layers=(2, 8, 16)).for_layers(32).layers == (2, 8, 16)
    assert SparseVLM(layers=(1, 3, 5)).for_layers(8).layers == (1, 3, 5)


# ---- on real (tiny) models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def v15(hf_llava: Path) -> shortv.LLaVA:
    model = shortv.load(hf_llava, device="cpu", dtype=torch.float32)
    assert model.config.image_aspect_ratio != "anyres"
    return model


@pytest.fixture(scope="module")
def next_(hf_llava_next: Path) -> shortv.LLaVA:
    model = shortv.load(hf_llava_next, device="cpu", dtype=torch.float32)
    assert model.config.image_aspect_ratio == "anyres"
    return model


@pytest.fixture(params=["llava-1.5", "llava-next"])
def model(request, v15, next_):
    model = v15 if request.param == "llava-1.5" else next_
    model.set_method(Vanilla())
    yield model
    model.set_method(Vanilla())


@pytest.mark.parametrize("method", [PDrop(), SparseVLM()], ids=["pdrop", "sparsevlm"])
def test_set_method_fills_in_concrete_layers(v15, method):
    """On a 4-layer model the defaults attach (the 32-layer ids did not), and the attached
    method's fields (what an answer file records) name the layers."""
    expected = {"pdrop": PDROP_LAYERS, "sparsevlm": SPARSEVLM_LAYERS}[method.name][v15.num_layers]
    try:
        v15.set_method(method)
        fields = dataclasses.asdict(v15.method)
        assert fields["layers"] == expected
        assert None not in fields["layers"]
        assert str(expected) in v15.method.describe()
    finally:
        v15.set_method(Vanilla())


def prompts(model: shortv.LLaVA) -> list[shortv.Encoded]:
    """A batch (left padding): one image; two images of other sizes; no image."""
    return [
        model.encode("What is this?", [noise_image(40, 30, 0)]),
        model.encode("Compare <image> with <image>, please.",
                     [noise_image(30, 50, 1), noise_image(64, 20, 2)]),
        model.encode("hello there"),
    ]


def visual_counts(model: shortv.LLaVA, batch: list[shortv.Encoded]) -> tuple[int, int]:
    """(most visual tokens in a sequence, most patches of one image) under vanilla."""
    types = model.prepare(batch).types
    per_sequence = int((types == int(shortv.TokenType.VISUAL)).sum(dim=1).max())
    patches = model.config.vision.num_patches
    per_image = max(im.shape[0] if im.dim() == 4 else 1 for e in batch for im in e.images) * patches
    return per_sequence, per_image


# Each method at full budget, built from (decoder layers, most visual tokens of a sequence,
# most patches of an image).
FULL: dict[str, Callable[[int, int, int], shortv.Method]] = {
    "shortv-none": lambda layers, n, p: ShortV(()),
    "fastv-r0": lambda layers, n, p: FastV(k=1, r=0.0),
    "pdrop-lam1": lambda layers, n, p: PDrop(lam=1.0),
    "pdrop-budget-all": lambda layers, n, p: PDrop(budget=576),
    "pdrop-budget-above": lambda layers, n, p: PDrop(layers=(1, 2), budget=10_000, budget_of=2880),
    "dart-budget-n": lambda layers, n, p: DART(k=1, budget=n, pivot_image=1, pivot_text=4),
    "dart-ratio0": lambda layers, n, p: DART(k=2, reduction_ratio=0.0),
    "sparsevlm-576": lambda layers, n, p: SparseVLM(budget=576),
    "sparsevlm-schedule-all": lambda layers, n, p: SparseVLM(layers=(0, 1), schedule=(576, 576)),
    "visionzip-patches": lambda layers, n, p: VisionZip(budget=p),
    "visionzip-above": lambda layers, n, p: VisionZip(budget=100_000),
    "compose": lambda layers, n, p: compose(ShortV(()), FastV(k=1, r=0.0), VisionZip(budget=p)),
}




@pytest.mark.parametrize("name", FULL)
def test_full_budget_is_vanilla(model, name):
    """On LLaVA-NeXT too: an image whose every patch VisionZip keeps is vanilla's (unpadding,
    row-end tokens), because LLaVA asks `Method.keeps_image` before reducing it."""
    batch = prompts(model)
    with torch.inference_mode():
        vanilla = model.module.decoder.head(model.hidden_states(model.prepare(batch)))
        n_visual, n_patches = visual_counts(model, batch)
        model.set_method(FULL[name](model.num_layers, n_visual, n_patches))
        prepared = model.prepare(batch)
        got = model.module.decoder.head(model.hidden_states(prepared))
    assert got.shape == vanilla.shape, "the method changed the number of visual tokens"
    real = prepared.types != int(shortv.TokenType.PAD)
    torch.testing.assert_close(got[real], vanilla[real], **TOL)


def test_full_budget_generation_is_vanilla(v15):
    """Greedy answers too (prefill + decode through the KV cache)."""
    prompt, images = ["Describe <image> briefly."], [[noise_image(40, 30, 3)]]
    v15.set_method(Vanilla())
    expected = [r.token_ids for r in v15.generate(prompt, images, max_new_tokens=6)]
    try:
        v15.set_method(compose(VisionZip(budget=v15.config.vision.num_patches), PDrop(lam=1.0)))
        assert [r.token_ids for r in v15.generate(prompt, images, max_new_tokens=6)] == expected
    finally:
        v15.set_method(Vanilla())


# ---- impossible options ------------------------------------------------------------------------

IMPOSSIBLE = {
    "dart-budget-0": lambda: DART(budget=0),
    "dart-budget-negative": lambda: DART(budget=-5),
    "dart-budget-below-image-pivots": lambda: DART(budget=3),
    "dart-budget-0-no-image-pivots": lambda: DART(budget=0, pivot_image=0),
    "dart-k0": lambda: DART(k=0),
    "dart-ratio-1": lambda: DART(reduction_ratio=1.0),
    "dart-no-pivots": lambda: DART(pivot_image=0, pivot_text=0),
    "fastv-r-above-1": lambda: FastV(r=1.5),
    "fastv-r-negative": lambda: FastV(r=-0.1),
    "fastv-k-negative": lambda: FastV(k=-1),
    "fastv-k0": lambda: FastV(k=0),
    "pdrop-lam0": lambda: PDrop(lam=0.0),
    "pdrop-lam-above-1": lambda: PDrop(lam=1.5),
    "pdrop-layers-decreasing": lambda: PDrop(layers=(16, 8, 24)),
    "pdrop-layers-repeated": lambda: PDrop(layers=(8, 8, 24)),
    "pdrop-layer-0": lambda: PDrop(layers=(0, 8)),
    "pdrop-layers-empty": lambda: PDrop(layers=()),
    "pdrop-budget-0": lambda: PDrop(budget=0),
    "pdrop-budget-of-0": lambda: PDrop(budget_of=0),
    "sparsevlm-budget-0": lambda: SparseVLM(budget=0),
    "sparsevlm-layers-decreasing": lambda: SparseVLM(layers=(6, 2, 15)),
    "sparsevlm-layers-vs-schedule": lambda: SparseVLM(layers=(2, 6)),
    "sparsevlm-schedule-negative": lambda: SparseVLM(layers=(2,), schedule=(-1,)),
    "visionzip-budget-0": lambda: VisionZip(budget=0),
    "visionzip-budget-negative": lambda: VisionZip(budget=-64),
    "visionzip-budget-float": lambda: VisionZip(budget=64.0),
    "vtw-negative": lambda: VTW(k=-1),
    "shortv-negative": lambda: ShortV((-1, 3)),
    "shortv-repeated": lambda: ShortV((3, 3)),
}


@pytest.mark.parametrize("build", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_impossible_options_fail_when_built(build):
    with pytest.raises(ConfigError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message and ("use" in message or "give" in message), message


@pytest.mark.parametrize(("method", "depth"), [
    (FastV(k=4), 4), (DART(k=4), 4), (VTW(k=4), 4), (PDrop(layers=(2, 4)), 4),
    (SparseVLM(layers=(0, 1, 3)), 4), (ShortV((4,)), 4)])
def test_options_beyond_the_depth_fail_when_attached(method, depth):
    with pytest.raises(ConfigError):
        method.for_layers(depth)


@pytest.mark.parametrize("options", [["--budget", "0"], ["--param", "budget=0"], ["--param", "k=0"]])
def test_cli_refuses_impossible_dart_options_in_one_line(capsys, options):
    argv = ["chat", "--model", "llava-tiny-demo", "--prompt", "hi", "--method", "dart", *options]
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert options[1].partition("=")[0] in err, err
