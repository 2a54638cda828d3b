"""ShortV, FastV and VTW against references that do not use the code under test.

References (all on the model's own weights):
- ShortV: a *vanilla* run with forward hooks that reset the visual rows of each frozen
  layer's output to the layer's input (docs/design.md §6: "the vanilla layer's output with the
  attention and MLP residual updates of visual tokens set to zero").
- VTW / FastV: `reference_decoder` (tests/reference.py), an explicit float64 Llama forward
  (own RMSNorm, RoPE, softmax(QKᵀ/√d + mask)·V, SwiGLU) in which chosen keys are masked
  for all queries from some layer on — dropping a token for all later layers is the same
  as hiding it as a key, since RoPE positions are kept.
- FastV's kept set: explicit attention probabilities of layer k−1's last query (mean over
  heads), from the layer's input captured with a hook.
- Token types: rebuilt from the input ids (each IMAGE_TOKEN → that image's visual tokens)
  rather than taken from `prepare`.
- FLOPs: torch's FlopCounterMode on the real decoder forward against closed forms.

Everything in fp32 (reference in fp64) unless noted; one bf16 smoke test.
"""

from __future__ import annotations

import json

import pytest
import torch

import shortv
from shortv import VTW, ConfigError, FastV, InputError, ShortV, Vanilla
from shortv.flops import sequence_flops
from shortv.store import locate

from .reference import (
    P_,
    T_,
    TOL,
    V_,
    _attention_probs,
    assert_rows_close,
    base_mask,
    batch_prompts,
    cached_tokens,
    closed_form_layer,
    counted_flops,
    fastv_dropped,
    frozen_reference,
    pinned_keys,
    pinned_reference_tokens,
    prepared_and_types,
    recomputed_tokens,
    reference_decoder,
    reference_head,
    select_dropped,
    two_image_prompt,
    visual_per_image,
)

DEMO = "llava-tiny-demo"


# ---- fixtures (images, demo_model and gqa_model: tests/conftest.py) -------------------------


@pytest.fixture
def demo(demo_model: shortv.LLaVA):
    """The shared fp64 demo model, back to vanilla after every test."""
    demo_model.set_method(Vanilla())
    yield demo_model
    demo_model.set_method(Vanilla())


@pytest.fixture(params=["demo", "gqa"])
def any_model(request, demo_model: shortv.LLaVA):
    model = demo_model if request.param == "demo" else request.getfixturevalue("gqa_model")
    model.set_method(Vanilla())
    yield model
    model.set_method(Vanilla())


def test_reference_decoder_is_vanilla(any_model, images):
    """The explicit reference reproduces the model's vanilla forward (oracle sanity)."""
    prepared, types = prepared_and_types(any_model, batch_prompts(any_model, images))
    with torch.no_grad():
        ours = any_model.hidden_states(prepared, method=Vanilla())
    ref, _ = reference_decoder(any_model, prepared, types)
    assert_rows_close(ours, ref, types != P_)


# ---- 1. ShortV: frozen layers == zeroed visual updates ------------------------------------


LAYER_SETS = {"first": (0,), "one-three": (1, 3), "all": tuple(range(8)), "last": (7,)}


@pytest.mark.parametrize("layers", LAYER_SETS.values(), ids=LAYER_SETS.keys())
@pytest.mark.parametrize("case", ["two-images", "batch"])
def test_shortv_equals_zeroed_visual_updates(demo, images, layers, case):
    batch = [two_image_prompt(demo, images)] if case == "two-images" else batch_prompts(demo, images)
    prepared, types = prepared_and_types(demo, batch)
    with torch.no_grad():
        ours = demo.hidden_states(prepared, method=ShortV(layers))
        vanilla = demo.hidden_states(prepared, method=Vanilla())
    ref = frozen_reference(demo, prepared, types, layers)
    real = types != P_
    assert_rows_close(ours, ref, real)
    # Not vacuous: freezing changes the visual states, and the text states whenever a
    # later layer lets text attend to them.
    assert (ours - vanilla)[types == V_].abs().max() > 1e-3
    if min(layers) < 7:
        assert (ours - vanilla)[types == T_].abs().max() > 1e-3
    # In every frozen layer the visual rows pass through bit for bit.
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].clone()))
             for layer in demo.module.decoder.layers]
    try:
        with torch.no_grad():
            demo.module.decoder(prepared.embeds, prepared.types, prepared.positions, method=ShortV(layers))
    finally:
        for hook in hooks:
            hook.remove()
    for i in layers:
        after = captured[i + 1] if i + 1 < len(captured) else ours
        vis = types == V_
        assert torch.equal(after[vis], captured[i][vis]), f"layer {i} changed visual rows"


def test_shortv_on_gqa_model(gqa_model, images):
    """Grouped-query attention: frozen rows still see all KV heads correctly."""
    batch = batch_prompts(gqa_model, images)
    prepared, types = prepared_and_types(gqa_model, batch)
    for layers in [(0,), (1, 3), (0, 1, 2, 3)]:
        with torch.no_grad():
            ours = gqa_model.hidden_states(prepared, method=ShortV(layers))
        assert_rows_close(ours, frozen_reference(gqa_model, prepared, types, layers), types != P_)


@pytest.mark.parametrize("layers", [(1, 3), (0, 7), tuple(range(8))])
def test_logits_with_set_frozen_layers_match_reference(demo, images, layers):
    enc = two_image_prompt(demo, images)
    prepared, types = prepared_and_types(demo, [enc])
    demo.set_frozen_layers(layers)
    ours = demo.logits(enc)
    ref = reference_head(demo, frozen_reference(demo, prepared, types, layers))[0]
    assert ours.shape == (types.shape[1], demo.config.text.vocab_size)
    torch.testing.assert_close(ours.double(), ref, **TOL)
    demo.set_frozen_layers([])
    vanilla = demo.logits(enc)
    assert (vanilla - ours)[-1].abs().max() > 1e-3


# ---- 2 + 6. Generation with the KV cache == recomputation --------------------------------


GEN_METHODS = {"shortv": ShortV((1, 3, 7)), "shortv-all": ShortV(tuple(range(8))),
               "vtw": VTW(3), "vtw0": VTW(0), "vanilla": Vanilla()}


@pytest.mark.parametrize("method", GEN_METHODS.values(), ids=GEN_METHODS.keys())
def test_generation_with_cache_equals_recomputation(demo, images, method):
    batch = batch_prompts(demo, images)
    demo.set_method(method)
    got = cached_tokens(demo, batch, 10)
    for enc, tokens in zip(batch, got, strict=True):
        assert tokens == recomputed_tokens(demo, enc, 10)
    # batch of one as well (no padding, plain causal kernels in the prefill)
    assert cached_tokens(demo, batch[1:2], 10)[0] == got[1]


@pytest.mark.parametrize("k,r", [(1, 0.5), (3, 0.25)])
def test_fastv_generation_with_cache_equals_recomputation(demo, images, k, r):
    """With the cache, FastV chooses its kept tokens once, at the prefill (the last prompt
    token's attention); the reference recomputes every step with that set hidden as keys
    from layer k on (explicit float64 forward)."""
    batch = batch_prompts(demo, images)
    demo.set_method(FastV(k=k, r=r))
    got = cached_tokens(demo, batch, 10)
    for enc, tokens in zip(batch, got, strict=True):
        prepared, types = prepared_and_types(demo, [enc])
        dropped = fastv_dropped(demo, prepared, types, k, r)
        assert tokens == pinned_reference_tokens(
            demo, enc, 10, lambda new, d=dropped: pinned_keys(d, k, demo.num_layers, new))


# ---- 3. FLOPs on the real forward ----------------------------------------------------------


def test_flop_counter_shows_frozen_work_skipped(demo, images):
    prepared, types = prepared_and_types(demo, [two_image_prompt(demo, images)])
    c = demo.config.text
    n = types.shape[1]
    n_v = int((types == V_).sum())
    assert n_v == 2 * visual_per_image(demo)
    vanilla = counted_flops(demo, prepared, Vanilla())
    assert vanilla == c.layers * closed_form_layer(c, n, n)
    d, m, q_dim = c.hidden_size, c.intermediate_size, c.heads * c.head_dim
    o_dim = q_dim  # O maps heads·head_dim -> d
    skipped_per_layer = (2 * n_v * d * (q_dim + o_dim)  # Q and O projections
                         + 2 * n_v * 3 * d * m  # gate, up, down
                         + 2 * 2 * n_v * n * q_dim)  # scores and weighted values, n keys
    for layers in [(0,), (1, 3), tuple(range(8)), (7,)]:
        shortv_flops = counted_flops(demo, prepared, ShortV(layers))
        assert vanilla - shortv_flops == len(layers) * skipped_per_layer


@pytest.mark.parametrize("method", [Vanilla(), ShortV((1, 3, 5)), FastV(k=1, r=0.5), VTW(k=2)],
                         ids=["vanilla", "shortv", "fastv", "vtw"])
def test_flop_counter_agrees_with_sequence_flops(demo, images, method):
    prepared, types = prepared_and_types(demo, [two_image_prompt(demo, images)])
    measured = counted_flops(demo, prepared, method)
    analytic = sequence_flops(demo.config.text, method, prepared.types[0])
    assert abs(measured - analytic) <= 0.02 * analytic
    # Tighter, from shapes: the per-layer token counts of each method.
    c = demo.config.text
    n, n_v = types.shape[1], int((types == V_).sum())
    per_layer = []
    for i in range(c.layers):
        if isinstance(method, ShortV) and i in method.layers:
            per_layer.append((n - n_v, n))
        elif isinstance(method, FastV) and i >= method.k:
            kept = n - n_v + round((1 - method.r) * n_v)
            per_layer.append((kept, kept))
        elif isinstance(method, VTW) and i >= method.k:
            per_layer.append((n - n_v, n - n_v))
        else:
            per_layer.append((n, n))
    expected = sum(closed_form_layer(c, q, k) for q, k in per_layer)
    if isinstance(method, FastV):
        # the ranking in layer k-1 recomputes the last query row (its Q projection,
        # 2·d·heads·head_dim) and its scores over n keys (2·heads·head_dim·n); counted too
        expected += 2 * c.heads * c.head_dim * (n + c.hidden_size)
    assert analytic == expected
    assert measured == expected


# ---- 4. VTW == visual keys hidden from layer k on ----------------------------------------------


@pytest.mark.parametrize("k", [0, 2, 7])
@pytest.mark.parametrize("case", ["two-images", "batch"])
def test_vtw_equals_masked_visual_keys(demo, images, k, case):
    batch = [two_image_prompt(demo, images)] if case == "two-images" else batch_prompts(demo, images)
    prepared, types = prepared_and_types(demo, batch)
    with torch.no_grad():
        ours = demo.hidden_states(prepared, method=VTW(k))
    visual = types == V_
    ref, inputs = reference_decoder(demo, prepared, types, {i: visual for i in range(k, 8)})
    text = types == T_
    torch.testing.assert_close(reference_head(demo, ours[text]), reference_head(demo, ref[text]), **TOL)
    assert_rows_close(ours, ref, text)
    # dropped tokens keep the state they had when dropped
    assert_rows_close(ours, inputs[k], visual)
    if case == "two-images":
        demo.set_method(VTW(k))
        torch.testing.assert_close(demo.logits(batch[0])[text[0]].double(),
                                   reference_head(demo, ref[0][text[0]]), **TOL)
    vanilla, _ = reference_decoder(demo, prepared, types)
    assert (vanilla - ref)[:, -1].abs().max() > 1e-3  # the mask matters


# ---- 5. FastV: kept set from explicit attention, outputs == masked keys -------------------------


def _observe_fastv(model: shortv.LLaVA, prepared, k: int, r: float):
    """Run FastV(k, r); capture layer k-1's input and reported scores, and the (positions,
    types) of the tokens that reach layer k."""
    seen: dict[str, object] = {}

    def before_scores(module, args):
        seen["x"] = args[0].detach().clone()

    def scores_out(module, args, output):
        seen["scores"] = None if output[1] is None else output[1].scores[:, 0]  # last-query row

    def at_k(module, args):
        seg = args[1]
        seen["positions"], seen["types"] = seg.positions.clone(), seg.types.clone()

    handles = [model.module.decoder.layers[k - 1].register_forward_pre_hook(before_scores),
               model.module.decoder.layers[k - 1].register_forward_hook(scores_out),
               model.module.decoder.layers[k].register_forward_pre_hook(at_k)]
    try:
        with torch.no_grad():
            out = model.hidden_states(prepared, method=FastV(k=k, r=r))
    finally:
        for h in handles:
            h.remove()
    return out, seen


# r = 0 (no drop, no ranking: vanilla) is tests/test_method_defaults.py.
FASTV = [(1, 0.5), (2, 0.4), (3, 0.75), (2, 1.0), (7, 0.5)]


@pytest.mark.parametrize("k,r", FASTV, ids=[f"k{k}-r{r}" for k, r in FASTV])
@pytest.mark.parametrize("case", ["two-images", "batch"])
def test_fastv_kept_set_and_outputs(any_model, images, k, r, case):
    model = any_model
    if k >= model.num_layers:
        k = model.num_layers - 1
    batch = [two_image_prompt(model, images)] if case == "two-images" else batch_prompts(model, images)
    prepared, types = prepared_and_types(model, batch)
    ours, seen = _observe_fastv(model, prepared, k, r)
    b, t = types.shape

    # Kept set from explicit attention probabilities of layer k-1 on its captured input.
    probs, _ = _attention_probs(model, k - 1, seen["x"], base_mask(types), prepared.positions)
    scores = probs[:, :, -1].mean(dim=1)  # last query row, mean over heads: [B, T]
    dropped, gap = select_dropped(scores, types, r)
    # The layer's own ranking signal agrees with the explicit one; the keep/drop boundary
    # is wider than their difference, so the kept set is well defined.
    reported = seen["scores"]
    assert reported is not None and reported.shape == (b, t)
    err = float((reported.double() - scores)[types != P_].abs().max())
    assert err < 1e-6
    assert gap > 10 * err, "near tie at the keep/drop boundary: choose other test data"
    pad = torch.tensor([t - n for n in prepared.lengths])
    for row in range(b):
        seg_types, seg_pos = seen["types"][row], seen["positions"][row]
        kept = set((seg_pos[seg_types == V_] + pad[row]).tolist())
        expected = set(torch.nonzero((types[row] == V_) & ~dropped[row]).flatten().tolist())
        n_vis = int((types[row] == V_).sum())
        assert len(expected) == round((1 - r) * n_vis)
        assert kept == expected, f"sequence {row}"
        # every text token reaches layer k
        text_pos = set((seg_pos[seg_types == T_] + pad[row]).tolist())
        assert text_pos == set(torch.nonzero(types[row] == T_).flatten().tolist())

    # Outputs == a forward with the dropped tokens hidden as keys from layer k on.
    ref, inputs = reference_decoder(model, prepared, types, {i: dropped for i in range(k, model.num_layers)})
    survivors = (types == T_) | ((types == V_) & ~dropped)
    assert_rows_close(ours, ref, survivors)
    if bool(dropped.any()):
        assert_rows_close(ours, inputs[k], dropped)
        vanilla, _ = reference_decoder(model, prepared, types)
        assert (vanilla - ref)[types == T_].abs().max() > 1e-4  # the drop matters


def test_fastv_selection_is_per_sequence(demo, images):
    """The same prompt alone and in a padded batch keeps the same tokens and gives the
    same outputs (selection, compaction and padding are per sequence)."""
    batch = batch_prompts(demo, images)
    prepared, _ = prepared_and_types(demo, batch)
    together, seen = _observe_fastv(demo, prepared, 2, 0.5)
    for row, enc in enumerate(batch):
        p1, t1 = prepared_and_types(demo, [enc])
        alone, seen1 = _observe_fastv(demo, p1, 2, 0.5)
        n = t1.shape[1]
        assert_rows_close(together[row, -n:], alone[0], t1[0] != P_)
        kept = seen["positions"][row][seen["types"][row] == V_]
        assert torch.equal(kept, seen1["positions"][0][seen1["types"][0] == V_])


# ---- 6. bf16 smoke ---------------------------------------------------------------------------


def test_bf16_smoke(images):
    model = shortv.load(DEMO, device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    batch = batch_prompts(model, images)
    prepared, types = prepared_and_types(model, batch)
    real = types != P_
    for method in [ShortV((1, 3)), FastV(k=1, r=0.5), VTW(k=2), Vanilla()]:
        with torch.no_grad():
            out = model.hidden_states(prepared, method=method)
        assert out.shape == prepared.embeds.shape and out.dtype == torch.bfloat16
        assert torch.isfinite(out[real]).all()
        model.set_method(method)
        tokens = cached_tokens(model, batch, 3)
        assert all(len(s) == 3 and all(0 <= x < model.config.text.vocab_size for x in s) for s in tokens)
        logits = model.logits(batch[1])
        assert logits.shape == (int(real[1].sum()), model.config.text.vocab_size)
    # frozen vs the hook reference, loosely: much closer than vanilla is
    layers = (1, 3)
    with torch.no_grad():
        ours = model.hidden_states(prepared, method=ShortV(layers)).float()
        vanilla = model.hidden_states(prepared, method=Vanilla()).float()
    ref = frozen_reference(model, prepared, types, layers).float()
    err = (ours - ref)[real].abs().max()
    scale = ref[real].abs().max()
    assert err <= 0.03 * scale
    assert err < 0.25 * (vanilla - ref)[real].abs().max()


# ---- 7. API validation --------------------------------------------------------------------------


def test_n_frozen_needs_a_ranking_without_a_card():
    with pytest.raises(ConfigError, match="ranking"):
        shortv.load(locate(DEMO), n_frozen=3)  # a directory: no zoo card, no ranking


def test_n_frozen_uses_the_cards_ranking():
    card = shortv.zoo.get_card(DEMO)
    model = shortv.load(DEMO, n_frozen=3)
    assert model.frozen_layers == tuple(sorted(card.ranking[:3]))


def test_n_frozen_with_ranking_list_file_and_string(tmp_path):
    model = shortv.load(DEMO, n_frozen=3, ranking=[6, 2, 4, 0, 1])
    assert model.frozen_layers == (2, 4, 6)
    assert isinstance(model.frozen_layers, tuple)
    assert isinstance(model.method, ShortV)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"ranking": [7, 5, 3, 1, 0, 2, 4, 6], "visual": [0.0] * 8}))
    assert shortv.load(DEMO, n_frozen=4, ranking=report).frozen_layers == (1, 3, 5, 7)
    assert shortv.load(DEMO, n_frozen=2, ranking=str(report)).frozen_layers == (5, 7)
    assert shortv.load(DEMO, n_frozen=2, ranking="3,0,5").frozen_layers == (0, 3)
    assert shortv.load(DEMO, n_frozen=0, ranking=[1]).frozen_layers == ()
    assert shortv.load(DEMO, n_frozen=8, ranking=list(range(7, -1, -1))).frozen_layers == tuple(range(8))
    with pytest.raises(ConfigError, match="ranking"):
        shortv.load(DEMO, n_frozen=1, ranking=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"visual": [1.0]}))
    with pytest.raises(ConfigError, match="ranking"):
        shortv.load(DEMO, n_frozen=1, ranking=tmp_path / "bad.json")


def test_frozen_layers_sorted_tuple():
    model = shortv.load(DEMO, frozen_layers=[7, 0, 3])
    assert model.frozen_layers == (0, 3, 7) and type(model.frozen_layers) is tuple
    model.set_frozen_layers([5, 1])
    assert model.frozen_layers == (1, 5)


@pytest.mark.parametrize("bad", [[1, 1], [8], [-1], [1.5], ["1"], [True], [0, 99]],
                         ids=["duplicate", "out-of-range", "negative", "float", "str", "bool", "99"])
def test_invalid_frozen_layers(bad):
    with pytest.raises(ConfigError):
        shortv.load(DEMO, frozen_layers=bad)


@pytest.mark.parametrize("bad", [[1, 1], [8], [-1], [1.5], [True]])
def test_invalid_set_frozen_layers_keeps_the_method(demo, bad):
    demo.set_frozen_layers([2])
    with pytest.raises(ConfigError):
        demo.set_frozen_layers(bad)
    assert demo.frozen_layers == (2,)


def test_set_frozen_layers_rejects_mixed_types_with_config_error(demo):
    with pytest.raises(ConfigError):
        demo.set_frozen_layers([1, "2"])


@pytest.mark.parametrize("kwargs", [
    dict(n_frozen=2, frozen_layers=[1]),
    dict(n_frozen=9, ranking=list(range(8))),
    dict(n_frozen=-1, ranking=list(range(8))),
    dict(n_frozen=True, ranking=list(range(8))),
    dict(n_frozen=2.0, ranking=list(range(8))),
    dict(n_frozen=5, ranking=[0, 1, 2]),
    dict(n_frozen=2, ranking=[0, 0, 1]),
    dict(n_frozen=2, ranking=[0, 9]),
    dict(frozen_layers=[1], ranking=[1, 2]),
    dict(frozen_layers=[1], method=ShortV((2,))),  # two freezing methods (FastV would compose)
    dict(method=FastV(k=8)),
    dict(method=VTW(k=8)),
], ids=["both", "n>L", "n<0", "n-bool", "n-float", "n>len(ranking)", "dup-ranking",
        "range-ranking", "layers+ranking", "layers+method", "fastv-kL", "vtw-kL"])
def test_invalid_load_arguments(kwargs):
    with pytest.raises(ConfigError):
        shortv.load(DEMO, **kwargs)


def test_set_frozen_layers_empty_is_vanilla(demo, images):
    enc = two_image_prompt(demo, images)
    vanilla = demo.logits(enc)
    demo.set_frozen_layers([1, 2])
    assert not torch.equal(demo.logits(enc), vanilla)
    demo.set_frozen_layers([])
    assert demo.frozen_layers == () and isinstance(demo.method, Vanilla)
    assert torch.equal(demo.logits(enc), vanilla)


# Options impossible on any model fail when built (tests/test_method_defaults.py); these
# fail when attached to the 8-layer demo.
@pytest.mark.parametrize("method", [FastV(k=8), VTW(k=8), ShortV((8,))],
                         ids=["fastv-kL", "vtw-kL", "shortv-8"])
def test_set_method_rejects_invalid(demo, method):
    demo.set_method(VTW(2))
    with pytest.raises(ConfigError):
        demo.set_method(method)
    assert demo.method == VTW(2)


def test_set_method_rejects_non_methods(demo):
    with pytest.raises(InputError):
        demo.set_method("fastv")


def test_methods_report_no_frozen_layers(demo):
    for method in [FastV(k=2), VTW(k=3), Vanilla()]:
        demo.set_method(method)
        assert demo.frozen_layers == ()
    demo.set_method(ShortV((4, 2)))
    assert demo.frozen_layers == (2, 4)
