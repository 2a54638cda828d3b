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
from unittest import mock

import pytest
import torch

from shortv import ConfigError, Vanilla
from shortv.flops import layer_tokens, sequence_flops
from shortv.methods.base import LayerView
from shortv.methods.sparsevlm import SCHEDULES, SparseVLM, budget_schedule, cluster_and_merge

from .reference import (
    P_,
    T_,
    V_,
    KeepRecorder,
    _attention_probs,
    assert_rows_close,
    authors_layer,
    authors_scores,
    base_mask,
    batch_prompts,
    cached_tokens,
    closed_form_layer,
    counted_flops,
    pinned_reference_tokens,
    prepared_and_types,
    random_rgb,
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
    counts = method.counts()
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
            every = [p for p in range(t) if types[row, p] == V_]  # raters: from every visual token
            text = [p for p in range(t) if types[row, p] == T_]
            cand = [p for p in text if p > every[0]] or text
            h = rater_hidden[row]
            relevance = torch.softmax(h[every] @ h[cand].T, dim=1).mean(dim=0)
            mean = float(relevance.mean())
            raters = [p for p, r in zip(cand, relevance.tolist(), strict=True) if r > mean] or cand
            margin = min(margin, float((relevance - mean).abs().min()))
            score = {p: float(attention[row, raters, p].mean()) for p in vis}
            n_keep = min(round(len(every) * counts[j] / 576), len(vis) - 1)
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


DROP_ONLY = dict(recycle=False, positions="original")  # what the hidden-keys reference models
METHODS = {"b192": SparseVLM(LAYERS, **DROP_ONLY), "b64": SparseVLM(LAYERS, budget=64, **DROP_ONLY),
           "sched": SparseVLM((2, 4), schedule=(250, 40), **DROP_ONLY),
           "last": SparseVLM((0, 6), budget=None, schedule=(400, 100), **DROP_ONLY)}


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
    """576 visual tokens keep exactly the released counts; others keep round(n · s / 576);
    recycled tokens are visual tokens of the next stages."""
    method = SparseVLM(budget=128, recycle=False)
    types = torch.tensor([0] * 30 + [1] * 576 + [0] * 40)
    kept = [lt.keys - 70 for lt in layer_tokens(demo.config.text.__class__(), method, types)]
    assert kept == [576] * 3 + [303] * 4 + [110] * 9 + [36] * 16
    # recycled: int(0.3 · dropped) + 1 clustered into int(that / 10) + 1 tokens after each stage
    kept = [lt.keys - 70 for lt in layer_tokens(demo.config.text.__class__(), SparseVLM(), types)]
    assert kept == [576] * 3 + [300 + 9] * 4 + [200 + 4] * 9 + [110 + 3] * 16
    types2 = torch.tensor([0] * 5 + [1] * 72 + [0] * 20)
    kept = [lt.keys - 25 for lt in layer_tokens(demo.config.text, SparseVLM(LAYERS, recycle=False), types2)]
    # 72 · 300/576 = 37.5 → 38 (halves to even); 72 · 200/576 = 25; 72 · 110/576 = 13.75 → 14
    assert kept == [72, 72, 38, 38, 25, 25, 14, 14]
    assert budget_schedule(192) == SCHEDULES[192] and budget_schedule(32) == (33, 15, 8)
    assert SparseVLM().counts() == (300, 200, 110)


def test_raters_are_chosen_from_the_inputs_of_every_visual_token():
    """The raters come from the pass's input embeddings and *every* visual token of it (the
    code chooses them once, before layer 0), not from the drop layer's surviving tokens."""
    g = torch.Generator().manual_seed(0)
    first_types = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    inputs = torch.randn(1, 12, 8, generator=g, dtype=torch.float64)
    origin = torch.tensor([[0, 1, 3, 5, 6, 8, 9, 10, 11]])  # visual 2, 4, 7 dropped earlier
    types = first_types.gather(1, origin)
    t = types.shape[1]
    at = torch.nonzero(types[0] == 0).flatten()
    scores = torch.rand(1, at.numel(), t, generator=g, dtype=torch.float64)
    real = torch.ones(1, at.numel(), dtype=torch.bool)
    view = LayerView(2, types, torch.randn(1, t, 8, generator=g, dtype=torch.float64), lambda x: x,
                     scores=scores, query_positions=at[None], query_real=real,
                     inputs=inputs, input_types=first_types, origin=origin)
    method = SparseVLM((1,), schedule=(192,), recycle=False)  # 6 visual → round(2) = 2 kept
    vis, cand = [2, 3, 4, 5, 6, 7], [8, 9, 10, 11]
    rel = torch.softmax(inputs[0, vis] @ inputs[0, cand].T, dim=1).mean(0)
    raters = [c for i, c in enumerate(cand) if rel[i] > rel.mean()]
    rows = [i for i, p in enumerate(at.tolist()) if int(origin[0, p]) in raters]
    rating = scores[0, rows].mean(0)
    here = [p for p in range(t) if types[0, p] == 1]
    top = sorted(here, key=lambda p: (-float(rating[p]), p))[:2]
    expected = [p for p in range(t) if types[0, p] == 0 or p in top]
    assert method.keep(view)[0].nonzero().flatten().tolist() == expected


def test_generation_with_cache_equals_pinned_recomputation(demo, images):
    """In generation the kept sets are chosen once, at the prefill (as the code, which only
    prunes when the input is longer than one token); the reference recomputes every step
    with those sets hidden from their drop layers on."""
    batch = batch_prompts(demo, images)
    method = SparseVLM(LAYERS, budget=64, **DROP_ONLY)
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
    method = SparseVLM(LAYERS, budget=64)  # recycling, renumbered positions: per sequence
    prepared, _ = prepared_and_types(demo, batch)
    with KeepRecorder(SparseVLM) as recorder:
        together, _ = observe(demo, prepared, method)
    for row, enc in enumerate(batch):
        p1, t1 = prepared_and_types(demo, [enc])
        with KeepRecorder(SparseVLM) as alone_recorder:
            alone, _ = observe(demo, p1, method)
        n = t1.shape[1]
        pad = prepared.types.shape[1] - n
        assert_rows_close(together[row, -n:], alone[0], t1[0] != P_)
        if not alone_recorder.kept:  # no image: nothing to drop alone, nothing kept together
            assert all(rows[row] == [] for _, rows in recorder.kept)
        for (_, rows), (_, alone_rows) in zip(recorder.kept, alone_recorder.kept, strict=False):
            assert [i - pad for i in rows[row]] == alone_rows[0]


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
    # kept 38, 25, 14 (round(72 · s / 576)) plus the recycled: 34 dropped → 11 → 2 tokens,
    # 15 → 5 → 1, 12 → 4 → 1
    kept = [72, 72, 38 + 2, 38 + 2, 25 + 1, 25 + 1, 14 + 1, 14 + 1]
    assert int((types == V_).sum()) == 72
    first = int(torch.nonzero(types[0] == V_)[0])
    candidates = int((types[0, first:] == T_).sum())
    q_dim, d = c.heads * c.head_dim, c.hidden_size
    # counted: each pruning layer's capture, every text row's Q projection and its scores
    capture = sum(2 * n_text * q_dim * (d + n_text + kept[layer]) for layer in LAYERS)
    assert analytic == sum(closed_form_layer(c, n_text + k, n_text + k) for k in kept) + capture
    # not counted (the method's own arithmetic): the raters' relevance over every visual
    # token, at each stage; the clustering's distances are no matmul
    relevance = sum(2 * 72 * candidates * d for _ in LAYERS)
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


# ---- the authors' code -----------------------------------------------------------------------


def authors_cluster_and_merge(x: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """Transcribed from Gumpest/SparseVLMs at 26a5f48, llava/model/language_model/utils.py
    (`cluster_and_merge`, with `index_points` inlined): x [B, N, C]."""
    b, n, c = x.shape
    x1 = x[:, :, None, :]
    x2 = x[:, None, :, :]
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (c ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    batch_indices = torch.arange(b, dtype=torch.long)[:, None].repeat(1, cluster_num)
    dist_matrix = dist_matrix[batch_indices, index_down, :]
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(b)[:, None].expand(b, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(b, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    token_weight = x.new_ones(b, n, 1)
    idx = idx_cluster + torch.arange(b)[:, None] * cluster_num
    all_weight = token_weight.new_zeros(b * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(b * n), source=token_weight.reshape(b * n, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(b * cluster_num, c)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(b * n), source=source.reshape(b * n, c).type(x.dtype))
    return x_merged.reshape(b, cluster_num, c)


def authors_sparsevlm(model, embeds: torch.Tensor, types: torch.Tensor, pruning_loc: list[int],
                      sparse_token_list: list[int], new_tokens: int):
    """Transcribed from Gumpest/SparseVLMs at 26a5f48 (v1.0):
    modelling_sparse_llama.py `LlamaDynamicvitModel.forward` (rater selection, pruning after
    the pruning layers, recycling, `position_ids[:, :n]`), score.py `attn_postprocess_topk`,
    and the attention's v1.0 decode position (`past_key_value.get_usable_length` of each
    layer). One sequence (embeds [T, D], one image), then greedy decode steps. The global
    generator is seeded with 0 before each `cluster_and_merge` (shortv's noise). Returns
    (kept image columns per stage, recycled tokens per stage, last logits, greedy tokens)."""
    num_layers = model.num_layers
    hidden_states = embeds.double()
    v_token_start = int(torch.nonzero(types == V_)[0])
    image_shape = int((types == V_).sum())
    text_token_start = v_token_start + image_shape
    v_token_num = image_shape
    v_t = hidden_states[v_token_start:text_token_start, :]
    t_t = hidden_states[text_token_start:, :]
    m_v_t = (v_t @ t_t.transpose(0, 1)).softmax(1).mean(0)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())[0]
    position_ids = torch.arange(hidden_states.shape[0])
    origin = list(range(hidden_states.shape[0]))
    caches: list = [None] * num_layers
    kept, recycled = [], []
    for layer_idx in range(num_layers):
        out, caches[layer_idx] = authors_layer(model, layer_idx, hidden_states, position_ids)
        if layer_idx in pruning_loc:
            every_row = torch.arange(hidden_states.shape[0])
            attn = authors_scores(model, layer_idx, hidden_states, position_ids, every_row).mean(0)
            cur_text_token_idx = t_token_idx + text_token_start
            relation_vis_text = attn[cur_text_token_idx, v_token_start:v_token_start + v_token_num].mean(0)
            count = min(sparse_token_list[pruning_loc.index(layer_idx)], v_token_num - 1)
            mask = torch.zeros_like(relation_vis_text, dtype=torch.bool)
            mask[torch.topk(relation_vis_text, count).indices] = True
            policy = torch.ones(hidden_states.shape[0], dtype=torch.bool)
            policy[v_token_start:text_token_start] = mask
            total_sparse_token_idx = torch.where(~policy)[0]
            select_token_idx = torch.where(policy)[0]
            select_vis_token_num = int(mask.sum())
            kept.append(sorted(origin[i] for i in select_token_idx.tolist()
                               if v_token_start <= i < text_token_start and origin[i] >= 0))
            if total_sparse_token_idx.shape[0] > 0:
                total_sparse_token = out[total_sparse_token_idx]
                merge_token_stage1 = relation_vis_text[torch.where(~mask)[0]]
                merge_token_num_stage1 = int(merge_token_stage1.shape[0] * 0.3) + 1
                merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
                merge_token_stage2 = total_sparse_token[merge_token_stage2_idx]
                cluster_num = int(merge_token_stage2.shape[0] / 10) + 1
                torch.manual_seed(0)
                merge_sparse_token = authors_cluster_and_merge(merge_token_stage2[None], cluster_num)[0]
                recycled.append(merge_sparse_token)
                select_token = out[select_token_idx]
                split = v_token_start + select_vis_token_num
                out = torch.cat((select_token[:split], merge_sparse_token, select_token[split:]))
                origin = [origin[i] for i in select_token_idx.tolist()]
                origin = origin[:split] + [-1] * cluster_num + origin[split:]
                position_ids = position_ids[:select_token_idx.shape[0] + cluster_num]
                v_token_num = select_vis_token_num + cluster_num
            text_token_start = v_token_start + v_token_num
        hidden_states = out
    logits = reference_head(model, hidden_states[-1])
    tokens = [int(logits.argmax())]
    while len(tokens) < new_tokens:
        h = model.module.decoder.embed_tokens.weight.double()[tokens[-1]][None]
        for layer_idx in range(num_layers):
            position = torch.tensor([caches[layer_idx][0].shape[1]])  # get_usable_length(layer)
            h, caches[layer_idx] = authors_layer(model, layer_idx, h, position, caches[layer_idx])
        step_logits = reference_head(model, h[-1])
        top = step_logits.topk(2).values
        assert top[0] - top[1] > 1e-6, "near tie: choose other test data"
        tokens.append(int(step_logits.argmax()))
    return kept, recycled, logits, tokens


class MergeRecorder:
    """Records what `SparseVLM.merge` returns while active."""

    def __init__(self) -> None:
        self.merged: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> MergeRecorder:
        original = SparseVLM.merge
        recorder = self

        def merge(method, view, keep):
            got = original(method, view, keep)
            if got is not None:
                recorder.merged.append(got)
            return got

        self._patch = mock.patch.object(SparseVLM, "merge", merge)
        self._patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.stop()


@pytest.mark.parametrize("budget", [192, 64])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("which", ["demo", "gqa"])
def test_kept_recycled_logits_and_generation_equal_the_authors_code(request, demo, which, seed, budget):
    """One image, a batch of one, the default pruning layers: the tokens kept at each stage,
    the recycled vectors, the prefill's logits and the greedy tokens of cached generation
    equal the authors' v1.0 code (raters once, recycling, renumbered positions)."""
    model = demo if which == "demo" else request.getfixturevalue("gqa_wide_model")
    image = random_rgb(40 + 17 * seed, 30, seed=seed)
    enc = model.encode("<image>\nWhat is shown in this picture, in a few words?", [image])
    prepared, types = prepared_and_types(model, [enc])
    method = SparseVLM(budget=budget).for_layers(model.num_layers)
    n = int((types == V_).sum())
    counts = [round(n * s / 576) for s in method.counts()]  # the code's list, for this image's n
    kept, recycled, logits, tokens = authors_sparsevlm(model, prepared.embeds[0], types[0],
                                                       list(method.layers), counts, new_tokens=4)
    model.set_method(method)
    with KeepRecorder(SparseVLM) as keeps, MergeRecorder() as merges:
        ours = model.logits(enc)[-1]
    assert [row[0] for _, row in keeps.kept] == kept
    assert len(merges.merged) == len(recycled)
    for (tokens_, real), expected in zip(merges.merged, recycled, strict=True):
        assert int(real.sum()) == expected.shape[0]
        torch.testing.assert_close(tokens_[0][real[0]], expected, atol=1e-9, rtol=1e-9)
    assert max(r.shape[0] for r in recycled) >= 1
    torch.testing.assert_close(ours, logits, atol=1e-6, rtol=1e-6)
    assert cached_tokens(model, [enc], 4)[0] == tokens
    # The hook points show the kept visual positions from the layer after each pruning
    # layer on; recycled tokens have no position and are not shown.
    _, cache = model.run_with_cache(enc, names=["resid_post"])
    visual = types[0] == V_
    for i in range(model.num_layers):
        stage = max((s for s, layer in enumerate(method.layers) if layer < i), default=None)
        expected = visual.nonzero().flatten().tolist() if stage is None else kept[stage]
        assert (cache.present["resid_post", i][0] & visual).nonzero().flatten().tolist() == expected, i
    model.set_method(SparseVLM(budget=budget, recycle=False, positions="original"))
    assert not torch.allclose(model.logits(enc)[-1], logits, atol=1e-4)  # v1.0's details matter


@pytest.mark.parametrize("n,clusters", [(83, 9), (25, 3), (7, 1)])
def test_cluster_and_merge_equals_the_authors_function(n, clusters):
    """On random tokens with the same noise (the global generator seeded as shortv seeds its own)."""
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.manual_seed(0)
    expected = authors_cluster_and_merge(x[None], clusters)[0]
    torch.testing.assert_close(cluster_and_merge(x, clusters), expected, atol=1e-12, rtol=1e-12)
