"""DART against references that do not use the code under test.

- Kept set: DART's rule written out per sequence on explicit float64 quantities: layer
  K − 1's rotated keys computed here from its input (`reference_decoder`), repeated to the
  query heads and concatenated as the official code does, their L1 norms; the input of
  layer K through the model's final RMSNorm; cosine similarities; pivots and rounds with
  Python lists.
- Outputs: `reference_decoder` with the dropped tokens hidden as keys from layer K on
  (1e-5; the demo model in float64, as in tests/test_methods.py).
- Generation with the KV cache equals recomputation with the prefill's kept set pinned;
  a padded batch equals one-by-one; FLOPs from FlopCounterMode agree with
  `sequence_flops`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import shortv
from shortv import ConfigError, Vanilla
from shortv.flops import layer_tokens, sequence_flops
from shortv.methods.base import LayerView
from shortv.methods.dart import DART, dart_kept

from .reference import (
    P_,
    T_,
    V_,
    _rms,
    _rope,
    assert_rows_close,
    authors_dart_retained,
    batch_prompts,
    cached_tokens,
    closed_form_layer,
    counted_flops,
    pinned_keys,
    pinned_reference_tokens,
    prepared_and_types,
    random_rgb,
    reference_decoder,
    two_image_prompt,
)


@pytest.fixture
def demo(demo_model: shortv.LLaVA):
    """The fp64 demo model (tests/conftest.py), back to vanilla after every test."""
    demo_model.set_method(Vanilla())
    yield demo_model
    demo_model.set_method(Vanilla())


def explicit_keys(model: shortv.LLaVA, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, T, heads · head_dim]: the layer's rotated keys of input x, repeated to the query
    heads (`repeat_kv`) and concatenated over heads, as DART's code reads them."""
    c = model.config.text
    w = model.module.decoder.layers[layer]
    h = _rms(x.double(), w.attn_norm.weight, c.rms_norm_eps)
    b, t, _ = h.shape
    k = (h @ w.attn.k_proj.weight.double().T).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
    k = _rope(k, positions, c.rope_theta).repeat_interleave(c.heads // c.kv_heads, dim=1)
    return k.transpose(1, 2).reshape(b, t, c.heads * c.head_dim)


def reference_dropped(model: shortv.LLaVA, prepared, types: torch.Tensor, method: DART):
    """(dropped [B, T], smallest gap at any ranking boundary) by DART's rule."""
    _, inputs = reference_decoder(model, prepared, types)
    l1 = explicit_keys(model, method.k - 1, inputs[method.k - 1], prepared.positions).abs().sum(-1)
    normed = _rms(inputs[method.k], model.module.decoder.norm.weight, model.config.text.rms_norm_eps)
    dropped = torch.zeros_like(types, dtype=torch.bool)
    gaps = [math.inf]

    def top(candidates: list[int], score, n: int) -> list[int]:
        ranked = sorted(candidates, key=lambda i: -score(i))
        if 0 < n < len(ranked):
            gaps.append(abs(score(ranked[n - 1]) - score(ranked[n])))
        return ranked[:n]

    for b in range(types.shape[0]):
        row = types[b].tolist()
        visual = [i for i, ty in enumerate(row) if ty == V_]
        if not visual:
            continue
        text_after = [i for i, ty in enumerate(row) if ty == T_ and i > max(visual)]
        text_before = [i for i, ty in enumerate(row) if ty == T_ and i < max(visual)]

        def norm(i, b=b):
            return float(l1[b, i])

        image_pivots = top(visual, norm, method.pivot_image)
        text_pivots = top(text_after, norm, method.pivot_text)
        if len(text_pivots) < method.pivot_text:
            text_pivots += top(text_before, norm, method.pivot_text - len(text_pivots))
        budget = method.budget
        if budget is None:
            budget = round(len(visual) * (1 - method.reduction_ratio))
        per_pivot = budget // (method.pivot_image + method.pivot_text)
        retained = list(image_pivots)
        pivots = image_pivots + text_pivots
        if method.pivot_order == "set":  # the code's loop: a set of sequence indices
            pad = row.count(P_)
            pivots = [i + pad for i in set([p - pad for p in pivots])]
        for p in pivots:
            left = [i for i in visual if i not in retained]

            def dissimilarity(i, p=p, b=b):
                a, v = normed[b, p], normed[b, i]
                return -float(a @ v / (a.norm() * v.norm()))

            retained += top(left, dissimilarity, per_pivot)
        assert len(retained) == dart_kept(len(visual), len(text_after) + len(text_before), method.budget,
                                          method.pivot_image, method.pivot_text, method.reduction_ratio)
        for i in visual:
            dropped[b, i] = i not in retained
    return dropped, min(gaps)


def observe(model: shortv.LLaVA, prepared, method: DART):
    """Run DART; the (positions, types) of the tokens that reach layer k."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args):
        seen["positions"], seen["types"] = args[1].positions.clone(), args[1].types.clone()

    handle = model.module.decoder.layers[method.k].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            out = model.hidden_states(prepared, method=method)
    finally:
        handle.remove()
    return out, seen


CASES = {
    "k2-b16": DART(k=2, budget=16),
    "k2-b16-norm": DART(k=2, budget=16, pivot_order="norm"),
    "k1-b8-2+2": DART(k=1, budget=8, pivot_image=2, pivot_text=2),
    "k3-ratio0.5": DART(k=3, reduction_ratio=0.5),
    "k7-b5-1+3": DART(k=7, budget=5, pivot_image=1, pivot_text=3),
    "k2-b4": DART(k=2, budget=4),  # the image pivots only, the least budget allowed
}


@pytest.mark.parametrize("method", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("case", ["two-images", "batch"])
def test_dart_kept_set_and_outputs(demo, images, method, case):
    batch = [two_image_prompt(demo, images)] if case == "two-images" else batch_prompts(demo, images)
    check_kept_set_and_outputs(demo, batch, method)


def test_dart_on_gqa_model(gqa_model, images):
    """Grouped-query attention: the L1 norm over the KV heads ranks like the code's norm
    over keys repeated to the query heads."""
    check_kept_set_and_outputs(gqa_model, batch_prompts(gqa_model, images), DART(k=1, budget=8))


def check_kept_set_and_outputs(model: shortv.LLaVA, batch, method: DART) -> None:
    prepared, types = prepared_and_types(model, batch)
    ours, seen = observe(model, prepared, method)
    dropped, gap = reference_dropped(model, prepared, types, method)
    assert gap > 1e-8, "near tie at a ranking boundary: choose other test data"
    b, t = types.shape
    pad = [t - n for n in prepared.lengths]
    for row in range(b):
        seg_types, seg_pos = seen["types"][row], seen["positions"][row]
        kept = set((seg_pos[seg_types == V_] + pad[row]).tolist())
        assert kept == set(torch.nonzero((types[row] == V_) & ~dropped[row]).flatten().tolist()), f"row {row}"
        assert set((seg_pos[seg_types == T_] + pad[row]).tolist()) == \
            set(torch.nonzero(types[row] == T_).flatten().tolist())
    hide = {i: dropped for i in range(method.k, model.num_layers)}
    ref, inputs = reference_decoder(model, prepared, types, hide)
    survivors = (types == T_) | ((types == V_) & ~dropped)
    assert_rows_close(ours, ref, survivors)
    if bool(dropped.any()):
        assert_rows_close(ours, inputs[method.k], dropped)
        if method.k < model.num_layers - 1:
            vanilla, _ = reference_decoder(model, prepared, types)
            assert (vanilla - ref)[types == T_].abs().max() > 1e-4  # the drop matters


def test_dart_generation_with_cache_equals_recomputation(demo, images):
    batch = batch_prompts(demo, images)
    method = DART(k=2, budget=12)
    demo.set_method(method)
    n = 8
    got = cached_tokens(demo, batch, n)
    for enc, tokens in zip(batch, got, strict=True):
        prepared, types = prepared_and_types(demo, [enc])
        dropped, _ = reference_dropped(demo, prepared, types, method)
        assert tokens == pinned_reference_tokens(
            demo, enc, n, lambda new, d=dropped: pinned_keys(d, method.k, demo.num_layers, new))
    assert cached_tokens(demo, batch[1:2], n)[0] == got[1]  # a batch of one, no padding


def test_dart_batch_equals_one_by_one(demo, images):
    batch = batch_prompts(demo, images)
    prepared, _ = prepared_and_types(demo, batch)
    method = DART(k=2, budget=16)
    together, seen = observe(demo, prepared, method)
    for row, enc in enumerate(batch):
        p1, t1 = prepared_and_types(demo, [enc])
        alone, seen1 = observe(demo, p1, method)
        n = t1.shape[1]
        assert_rows_close(together[row, -n:], alone[0], t1[0] != P_)
        kept = seen["positions"][row][seen["types"][row] == V_]
        assert torch.equal(kept, seen1["positions"][0][seen1["types"][0] == V_])


@pytest.mark.parametrize("method", [DART(k=2, budget=16), DART(k=1, reduction_ratio=0.5),
                                    DART(k=3, budget=200)], ids=["b16", "ratio", "all"])
def test_flop_counter_agrees_with_sequence_flops(demo, images, method):
    prepared, types = prepared_and_types(demo, [two_image_prompt(demo, images)])
    measured = counted_flops(demo, prepared, method)
    analytic = sequence_flops(demo.config.text, method, prepared.types[0])
    assert abs(measured - analytic) <= 0.02 * analytic
    c = demo.config.text
    n, n_text = types.shape[1], int((types == T_).sum())
    kept = n_text + dart_kept(n - n_text, n_text, method.budget, method.pivot_image, method.pivot_text,
                              method.reduction_ratio)
    expected = sum(closed_form_layer(c, *((n, n) if i < method.k else (kept, kept))) for i in range(c.layers))
    assert analytic == expected
    assert measured == expected  # DART captures keys only: no extra matmul


def test_kept_count_depends_on_counts_not_layout():
    """Text before the images only (the FLOPs placeholder's layout) or after: the same
    number kept, the text pivots topped up from the text before the images."""
    torch.manual_seed(0)
    method = DART(k=2, budget=32)
    for layout in (["T"] * 10 + ["V"] * 80, ["T"] * 3 + ["V"] * 80 + ["T"] * 2,
                   ["T"] * 5 + ["V"] * 40 + ["T"] * 4 + ["V"] * 40 + ["T"] * 1, ["V"] * 80 + ["T"] * 10):
        types = torch.tensor([[T_ if x == "T" else V_ for x in layout]])
        t = types.shape[1]
        view = LayerView(2, types, torch.randn(1, t, 8), lambda x: x, keys=torch.randn(1, t, 1, 8))
        kept = method.keep(view)
        assert bool(kept[types != V_].all())
        assert int((kept & (types == V_)).sum()) == dart_kept(80, 10, 32) == 4 + 8 * 4
    assert dart_kept(80, 2, 32) == 4 + 6 * 4  # fewer text tokens than text pivots
    assert dart_kept(576, 64, 128) == 132 and dart_kept(576, 64) == 132  # the code's default
    assert dart_kept(2880, 64, 320) == 324 and dart_kept(10, 64, 128) == 10
    vicuna = shortv.models.config.TextConfig()
    counts = [x.keys for x in layer_tokens(vicuna, DART(budget=64), torch.tensor([T_] * 64 + [V_] * 576))]
    assert counts[:2] == [640, 640] and set(counts[2:]) == {64 + 68}


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=8), dict(k=True), dict(k=1.0), dict(budget=-1),
                                 dict(budget=3.0), dict(pivot_image=-1), dict(pivot_image=0, pivot_text=0),
                                 dict(pivot_text=1.5), dict(reduction_ratio=1.2), dict(reduction_ratio=-0.1)])
def test_invalid_parameters(bad):
    with pytest.raises(ConfigError):
        DART(**bad).for_layers(8)


def test_describe():
    assert DART().describe() == "dart(k=2, reduction_ratio=0.778, pivots=4+4)"
    assert DART(budget=128).describe() == "dart(k=2, budget=128, pivots=4+4)"


def test_bf16_smoke(images):
    model = shortv.load("llava-tiny-demo", device="cpu", dtype=torch.bfloat16)
    batch = batch_prompts(model, images)
    prepared, types = prepared_and_types(model, batch)
    with torch.no_grad():
        out = model.hidden_states(prepared, method=DART(k=2, budget=16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out[types != P_]).all()
    model.set_method(DART(k=2, budget=16))
    assert all(len(s) == 3 for s in cached_tokens(model, batch, 3))


# ---- the authors' code -----------------------------------------------------------------------


@pytest.mark.parametrize("budget", [16, 24])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("which", ["demo", "gqa"])
def test_kept_tokens_equal_the_authors_code(request, demo, which, seed, budget):
    """One image, a batch of one, at the code's K = 2: shortv's kept visual tokens are the
    ones the authors' function returns (their pivot loop order included), and the logits
    equal the code's forward, which keeps the survivors' original positions."""
    model = demo if which == "demo" else request.getfixturevalue("gqa_wide_model")
    image = random_rgb(40 + 17 * seed, 30, seed=seed)
    enc = model.encode("<image>\nWhat is shown in this picture, in a few words?", [image])
    prepared, types = prepared_and_types(model, [enc])
    method = DART(k=2, budget=budget)
    _, inputs = reference_decoder(model, prepared, types)
    visual = torch.nonzero(types[0] == V_).flatten()
    start, length = int(visual[0]), visual.numel()
    keys = explicit_keys(model, 1, inputs[1], prepared.positions)  # [1, T, heads · head_dim]
    c = model.config.text
    any_states = keys.view(1, -1, c.heads, c.head_dim).transpose(1, 2)
    normed = _rms(inputs[2], model.module.decoder.norm.weight, c.rms_norm_eps)
    # the LLaVA code's TOKEN_TOPK, with the eval scripts' max_num_trunction = budget
    expected = torch.tensor(authors_dart_retained(normed, any_states, start, length,
                                                  token_topk=math.ceil(budget // 8)))
    ours, seen = observe(model, prepared, method)
    kept = seen["positions"][0][seen["types"][0] == V_]
    assert sorted(kept.tolist()) == sorted(expected.tolist())
    assert torch.equal(seen["positions"][0], kept_positions(types[0], expected))  # original positions
    dropped = (types == V_).clone()
    dropped[0, expected] = False
    hide = {i: dropped for i in range(2, model.num_layers)}
    ref, _ = reference_decoder(model, prepared, types, hide)
    assert_rows_close(ours, ref, types == T_)


def kept_positions(types: torch.Tensor, retained: torch.Tensor) -> torch.Tensor:
    keep = types != V_
    keep[retained] = True
    return torch.nonzero(keep).flatten()


def test_llava_next_takes_the_authors_next_budget(hf_llava_next, demo, capsys):
    """Without a budget, DART on LLaVA-NeXT keeps what the authors' eval scripts set for it
    (retain_token_num_for_llava_next = 320 tokens); LLaVA-1.5 keeps the ratio's count
    (128 of 576, their max_num_trunction); a given budget stays; `shortv flops` counts the
    same."""
    from shortv.flops import flops_report
    from shortv.zoo import card

    from .cli_runner import run_main

    next_model = shortv.load(hf_llava_next, device="cpu", dtype=torch.float32)
    assert next_model.check_method(DART()) == DART(budget=320)
    assert next_model.check_method(DART(budget=64)) == DART(budget=64)
    assert next_model.check_method(DART(reduction_ratio=0.0)) == DART(reduction_ratio=0.0)
    assert next_model.check_method(shortv.compose(shortv.ShortV((1,)), DART())).parts[1] == DART(budget=320)
    assert demo.check_method(DART()) == DART()
    assert dart_kept(2880, 64, 320) == 4 + 8 * 40
    code, out, err = run_main(["flops", "llava-v1.6-vicuna-7b", "--method", "dart", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert "budget=320" in report["method"]
    config = card("llava-v1.6-vicuna-7b").config
    assert report["tflops"] == flops_report(config.text, DART(budget=320), report["n_text"],
                                            report["n_visual"])["tflops"]
