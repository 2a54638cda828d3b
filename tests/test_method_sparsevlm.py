"""SparseVLM against references that do not use the code under test.

Reference: stage by stage, the explicit float64 forward of tests/reference.py
(`reference_decoder`) with the tokens dropped so far hidden as keys; the pruning layer's
attention probabilities computed here from its input (`_attention_probs`, mean over heads);
raters and kept sets chosen with plain Python (relevance mean_v softmax_t(h_v·h_t) above its
mean; visual tokens ranked by the raters' mean attention, the earlier first on ties; the
released schedule scaled by the chained rounding of the method's docstring). Outputs: the
same forward with every dropped token hidden from the layer after its pruning layer on.
"""

from __future__ import annotations

import math

import pytest
import torch

from shortv import ConfigError, Vanilla
from shortv.flops import layer_tokens, sequence_flops
from shortv.methods.base import LayerView
from shortv.methods.sparsevlm import SCHEDULES, SparseVLM, budget_schedule

from .reference import (
    P_,
    T_,
    V_,
    _attention_probs,
    assert_rows_close,
    base_mask,
    batch_prompts,
    cached_tokens,
    closed_form_layer,
    counted_flops,
    pinned_reference_tokens,
    prepared_and_types,
    reference_decoder,
    reference_head,
    two_image_prompt,
)

LAYERS = (1, 3, 5)


@pytest.fixture
def demo(demo_model):
    demo_model.set_method(Vanilla())
    yield demo_model
    demo_model.set_method(Vanilla())


# ---- reference -----------------------------------------------------------------------------


def reference_drops(model, prepared, types: torch.Tensor, method: SparseVLM):
    """Per pruning stage, [B, T] the visual tokens dropped there; and the smallest margin of
    any choice (rater threshold, keep/drop boundary)."""
    counts = (576, *method.counts())
    b, t = types.shape
    dropped = torch.zeros(b, t, dtype=torch.bool)
    hidden_keys: dict[int, torch.Tensor] = {}
    stages, margin = [], math.inf
    for j, layer in enumerate(method.layers):
        _, inputs = reference_decoder(model, prepared, types, hidden_keys)
        allowed = base_mask(types) & ~dropped[:, None, :]
        probs, _ = _attention_probs(model, layer, inputs[layer], allowed, prepared.positions)
        attention = probs.mean(dim=1)  # [B, T (queries), T (keys)]
        rater_hidden = inputs[0]  # the decoder input embeddings (the code rates on inputs_embeds)
        new = torch.zeros_like(dropped)
        for row in range(b):
            vis = [p for p in range(t) if types[row, p] == V_ and not dropped[row, p]]
            if not vis:
                continue
            text = [p for p in range(t) if types[row, p] == T_]
            cand = [p for p in text if p > vis[0]] or text
            h = rater_hidden[row]
            relevance = torch.softmax(h[vis] @ h[cand].T, dim=1).mean(dim=0)
            mean = float(relevance.mean())
            raters = [p for p, r in zip(cand, relevance.tolist(), strict=True) if r > mean] or cand
            margin = min(margin, float((relevance - mean).abs().min()))
            score = {p: float(attention[row, raters, p].mean()) for p in vis}
            n_keep = min(round(len(vis) * counts[j + 1] / counts[j]), len(vis) - 1)
            ranked = sorted(vis, key=lambda p: (-score[p], p))
            for p in ranked[n_keep:]:
                new[row, p] = True
            if 0 < n_keep < len(vis):
                margin = min(margin, score[ranked[n_keep - 1]] - score[ranked[n_keep]])
        stages.append(new)
        dropped = dropped | new
        for i in range(layer + 1, model.num_layers):
            hidden_keys[i] = dropped.clone()
    return stages, margin


def hidden_from(model, stages, method: SparseVLM, extra: int = 0) -> dict[int, torch.Tensor]:
    """hidden_keys for reference_decoder: every dropped token from the layer after its
    pruning layer on (padded with `extra` never-hidden positions at the end)."""
    out: dict[int, torch.Tensor] = {}
    dropped = torch.zeros_like(stages[0])
    for layer, new in zip(method.layers, stages, strict=True):
        dropped = dropped | new
        for i in range(layer + 1, model.num_layers):
            out[i] = torch.cat((dropped, torch.zeros(dropped.shape[0], extra, dtype=torch.bool)), 1)
    return out


def observe(model, prepared, method: SparseVLM):
    """Run the method; the (positions, types) of the tokens reaching each drop layer."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def at(layer):
        def hook(module, args):
            seen[layer] = (args[1].positions.clone(), args[1].types.clone())
        return hook

    handles = [model.module.decoder.layers[layer + 1].register_forward_pre_hook(at(layer + 1))
               for layer in method.layers]
    try:
        with torch.no_grad():
            out = model.hidden_states(prepared, method=method)
    finally:
        for h in handles:
            h.remove()
    return out, seen


# ---- tests ------------------------------------------------------------------------------------


METHODS = {"b192": SparseVLM(LAYERS), "b64": SparseVLM(LAYERS, budget=64),
           "sched": SparseVLM((2, 4), schedule=(250, 40)), "last": SparseVLM((0, 6), budget=None,
                                                                                schedule=(400, 100))}


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
@pytest.mark.parametrize("case", ["two-images", "batch"])
def test_kept_sets_and_outputs_match_reference(demo, images, method, case):
    batch = [two_image_prompt(demo, images)] if case == "two-images" else batch_prompts(demo, images)
    prepared, types = prepared_and_types(demo, batch)
    stages, margin = reference_drops(demo, prepared, types, method)
    assert margin > 1e-6, "near tie in the reference: choose other test data"
    ours, seen = observe(demo, prepared, method)
    pad = [types.shape[1] - n for n in prepared.lengths]
    dropped = torch.zeros_like(types, dtype=torch.bool)
    for layer, new in zip(method.layers, stages, strict=True):
        dropped = dropped | new
        positions, kinds = seen[layer + 1]
        for row in range(types.shape[0]):
            kept = set((positions[row][kinds[row] == V_] + pad[row]).tolist())
            expected = set(torch.nonzero((types[row] == V_) & ~dropped[row]).flatten().tolist())
            assert kept == expected, f"layer {layer + 1}, sequence {row}"
            text = set((positions[row][kinds[row] == T_] + pad[row]).tolist())
            assert text == set(torch.nonzero(types[row] == T_).flatten().tolist())
    assert bool(stages[0].any())
    ref, inputs = reference_decoder(demo, prepared, types, hidden_from(demo, stages, method))
    survivors = (types == T_) | ((types == V_) & ~dropped)
    assert_rows_close(ours, ref, survivors)
    for layer, new in zip(method.layers, stages, strict=True):
        if bool(new.any()):  # dropped tokens keep the state they had when dropped
            assert_rows_close(ours, inputs[layer + 1], new)
    vanilla, _ = reference_decoder(demo, prepared, types)
    assert (vanilla - ref)[types == T_].abs().max() > 1e-4  # the drops matter
    if case == "two-images":  # the logits of the surviving positions
        demo.set_method(method)
        torch.testing.assert_close(demo.logits(batch[0])[survivors[0]].double(),
                                   reference_head(demo, ref[0][survivors[0]]), atol=1e-5, rtol=1e-5)


def test_counts_follow_the_released_schedule(demo, images):
    """576 visual tokens keep exactly the released counts; others scale by chained rounding."""
    method = SparseVLM(budget=128)
    types = torch.tensor([0] * 30 + [1] * 576 + [0] * 40)
    kept = [lt.keys - 70 for lt in layer_tokens(demo.config.text.__class__(), method, types)]
    assert kept == [576] * 3 + [303] * 4 + [110] * 9 + [36] * 16
    types2 = torch.tensor([0] * 5 + [1] * 72 + [0] * 20)
    kept = [lt.keys - 25 for lt in layer_tokens(demo.config.text, SparseVLM(LAYERS), types2)]
    # 72 · 300/576 = 37.5 → 38 (halves to even); 38 · 200/300 → 25; 25 · 110/200 → 14
    assert kept == [72, 72, 38, 38, 25, 25, 14, 14]
    assert budget_schedule(192) == SCHEDULES[192] and budget_schedule(32) == (33, 15, 8)
    assert SparseVLM().counts() == (300, 200, 110)


def test_raters_from_embeddings_when_the_view_has_them():
    """With `embeddings` on the view the relevance is computed from them (the code's
    `inputs_embeds`), not from the layer's hidden states."""
    g = torch.Generator().manual_seed(0)
    types = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    t = types.shape[1]
    at = torch.nonzero(types[0] == 0).flatten()
    scores = torch.rand(1, at.numel(), t, generator=g, dtype=torch.float64)
    real = torch.ones(1, at.numel(), dtype=torch.bool)
    view = LayerView(2, types, torch.randn(1, t, 8, generator=g, dtype=torch.float64), lambda x: x,
                     scores=scores, query_positions=at[None], query_real=real)
    emb = torch.randn(1, t, 8, generator=g, dtype=torch.float64)
    method = SparseVLM((1,), schedule=(288,))  # keeps half

    def expected(h):
        vis, cand = [2, 3, 4, 5, 6, 7], [8, 9, 10, 11]
        rel = torch.softmax(h[0, vis] @ h[0, cand].T, dim=1).mean(0)
        rows = [i for i, p in enumerate(at.tolist()) if p in cand and rel[cand.index(p)] > rel.mean()]
        s = scores[0, rows].mean(0)
        top = sorted(vis, key=lambda p: (-float(s[p]), p))[:3]
        return [p for p in range(t) if types[0, p] == 0 or p in top]

    plain = method.keep(view)[0].nonzero().flatten().tolist()
    assert plain == expected(view.hidden)
    view.embeddings = emb
    with_emb = method.keep(view)[0].nonzero().flatten().tolist()
    assert with_emb == expected(emb)
    assert plain != with_emb


def test_generation_with_cache_equals_pinned_recomputation(demo, images):
    """In generation the kept sets are chosen once, at the prefill (as the code, which only
    prunes when the input is longer than one token); the reference recomputes every step
    with those sets hidden from their drop layers on."""
    batch = batch_prompts(demo, images)
    method = SparseVLM(LAYERS, budget=64)
    demo.set_method(method)
    got = cached_tokens(demo, batch, 8)
    for enc, tokens in zip(batch, got, strict=True):
        prepared, types = prepared_and_types(demo, [enc])
        if not bool((types == V_).any()):
            stages = [torch.zeros_like(types, dtype=torch.bool)] * 3
        else:
            stages, margin = reference_drops(demo, prepared, types, method)
            assert margin > 1e-6
        assert tokens == pinned_reference_tokens(
            demo, enc, 8, lambda new, s=stages: hidden_from(demo, s, method, new))


def test_padded_batch_equals_one_by_one(demo, images):
    batch = batch_prompts(demo, images)
    method = SparseVLM(LAYERS, budget=96)
    prepared, _ = prepared_and_types(demo, batch)
    together, seen = observe(demo, prepared, method)
    for row, enc in enumerate(batch):
        p1, t1 = prepared_and_types(demo, [enc])
        alone, seen1 = observe(demo, p1, method)
        n = t1.shape[1]
        assert_rows_close(together[row, -n:], alone[0], t1[0] != P_)
        for layer in seen:
            pos, kinds = seen[layer]
            pos1, kinds1 = seen1[layer]
            assert torch.equal(pos[row][kinds[row] == V_], pos1[0][kinds1[0] == V_])


def test_flop_counter_agrees_with_analytic_count(demo, images):
    """Within 2 % on an image-heavy input; exactly: the analytic count includes the capture
    (every text row's query projection and scores over the layer's keys in each pruning
    layer) and leaves out the raters' relevance (visual × candidate text × hidden)."""
    method = SparseVLM(LAYERS)
    c = demo.config.text
    heavy = demo.encode("<image>\n<image>\n<image>\nWhat?", images, template=False)
    prepared = demo.prepare([heavy])
    measured = counted_flops(demo, prepared, method)
    analytic = sequence_flops(c, method, prepared.types[0])
    assert abs(measured - analytic) <= 0.02 * analytic

    prepared, types = prepared_and_types(demo, [two_image_prompt(demo, images)])
    measured = counted_flops(demo, prepared, method)
    analytic = sequence_flops(c, method, prepared.types[0])
    n_text = int((types == T_).sum())
    kept = [72, 72, 38, 38, 25, 25, 14, 14]
    assert int((types == V_).sum()) == 72
    first = int(torch.nonzero(types[0] == V_)[0])
    candidates = int((types[0, first:] == T_).sum())
    q_dim, d = c.heads * c.head_dim, c.hidden_size
    # counted: each pruning layer's capture, every text row's Q projection and its scores
    capture = sum(2 * n_text * q_dim * (d + n_text + kept[layer]) for layer in LAYERS)
    assert analytic == sum(closed_form_layer(c, n_text + k, n_text + k) for k in kept) + capture
    # not counted (the method's own arithmetic): the raters' relevance
    relevance = sum(2 * kept[layer] * candidates * d for layer in LAYERS)
    assert measured == analytic + relevance


@pytest.mark.parametrize("bad", [dict(layers=(1, 7)), dict(layers=(3, 1, 5)), dict(layers=(1, 1, 2)),
                                 dict(layers=(1, 2)), dict(layers=LAYERS, budget=0),
                                 dict(layers=LAYERS, budget=True), dict(layers=(1, 2), schedule=(3,)),
                                 dict(layers=(1,), schedule=(-1,)), dict(layers=(1.5, 2, 3))])
def test_validation(bad):
    with pytest.raises(ConfigError):
        SparseVLM(**bad).for_layers(8)


def test_depth_checks():
    with pytest.raises(ConfigError):
        SparseVLM(layers=(1, 3, 7)).for_layers(8)  # no layer after 7 to drop from
    assert SparseVLM().for_layers(32).layers == (2, 6, 15)
    SparseVLM(LAYERS, budget=32).validate(8)
    assert "sparsevlm(layers=(2, 6, 15)" in SparseVLM().for_layers(32).describe()
