"""VisionZip against a reference that does not use the code under test.

Reference: the demo's CLIP tower run here explicitly in float64 (own patch embedding,
LayerNorms, softmax(QKᵀ/√d)·V, quick_gelu MLP), recording the select layer's attention and
keys; VisionZip's rule applied with plain Python sorting and loops (dominant = highest
class-token attention summed over heads; the rest merged into uniform-stride targets by
cosine similarity of head-averaged keys, target + mean of its assigned patches); the
projector, the splice and `reference_decoder` (tests/reference.py) then give the visual
tokens entering the language model and the logits.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from shortv import IMAGE_TOKEN, ConfigError, Vanilla
from shortv.flops import decoder_flops, sequence_flops
from shortv.methods.base import ImageView
from shortv.methods.visionzip import VisionZip, crop_shares, split, zip_crop

from .reference import (
    P_,
    T_,
    TOL,
    V_,
    assert_rows_close,
    batch_prompts,
    cached_tokens,
    counted_flops,
    recomputed_tokens,
    reference_decoder,
    reference_head,
    two_image_prompt,
)


@pytest.fixture
def demo(demo_model):
    demo_model.set_method(Vanilla())
    yield demo_model
    demo_model.set_method(Vanilla())


# ---- reference -----------------------------------------------------------------------------


def tower_reference(model, pixels: torch.Tensor):
    """Explicit float64 CLIP forward up to the select layer: (hidden [C, 1+N, W] at the
    select index, that layer's attention probabilities [C, H, 1+N, 1+N], keys [C, H, 1+N, d])."""
    tower, c = model.module.vision, model.config.vision
    (select,) = model.config.vision_hidden_indices

    def ln(x, norm):
        return F.layer_norm(x, (x.shape[-1],), norm.weight.double(), norm.bias.double(), norm.eps)

    def lin(x, layer):
        return x @ layer.weight.double().T + layer.bias.double()

    x = F.conv2d(pixels.double(), tower.patch_embed.weight.double(), stride=c.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((tower.class_embedding.double().expand(x.shape[0], 1, -1), x), dim=1)
    x = ln(x + tower.position_embedding.double(), tower.pre_norm)
    b, t, w = x.shape
    hd = w // c.heads
    probs = keys = None
    for layer in tower.layers[:select]:
        h = ln(x, layer.norm1)
        q, k, v = (lin(h, p).view(b, t, c.heads, hd).transpose(1, 2)
                   for p in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        keys = k
        x = x + lin((probs @ v).transpose(1, 2).reshape(b, t, w), layer.attn.out_proj)
        hm = lin(ln(x, layer.norm2), layer.mlp.fc1)
        x = x + lin(hm * torch.sigmoid(1.702 * hm), layer.mlp.fc2)
    return x, probs, keys


def zip_reference(hidden, probs, keys, tokens: int, with_cls: bool = False):
    """VisionZip's rule on one crop, written out: [tokens, W] (or all patches if it keeps
    at least as many), and the smallest ranking / similarity gap (a near tie would make the
    comparison ambiguous)."""
    n = hidden.shape[0] - 1
    if tokens >= n and not with_cls:
        return hidden[1:], math.inf
    n_ctx = round(tokens * 10 / 64)
    n_dom = tokens - n_ctx - (1 if with_cls else 0)
    score = [float(probs[:, 0, 1 + p].sum()) for p in range(n)]
    ranked = sorted(range(n), key=lambda p: (-score[p], p))
    gap = score[ranked[n_dom - 1]] - score[ranked[n_dom]] if 0 < n_dom < n else math.inf
    dominant = sorted(ranked[:n_dom])
    rest = sorted(ranked[n_dom:])
    rows = ([hidden[0]] if with_cls else []) + [hidden[1 + p] for p in dominant]
    if n_ctx:
        metric = {p: keys[:, 1 + p].mean(dim=0) for p in rest}
        metric = {p: m / m.norm() for p, m in metric.items()}
        step = max(1, len(rest) // n_ctx)
        targets = rest[::step][:n_ctx]
        groups: dict[int, list[int]] = {t: [] for t in targets}
        for p in rest:
            if p in groups:
                continue
            sims = [float(metric[p] @ metric[t]) for t in targets]
            best = max(range(len(targets)), key=lambda j: (sims[j], -j))
            others = sorted(sims, reverse=True)
            if len(others) > 1:
                gap = min(gap, others[0] - others[1])
            groups[targets[best]].append(p)
        for t in targets:
            merged = hidden[1 + t]
            if groups[t]:
                merged = merged + torch.stack([hidden[1 + p] for p in groups[t]]).mean(dim=0)
            rows.append(merged)
    return torch.stack(rows), gap


def reference_inputs(model, batch, tokens: int):
    """(prepared-like embeds/positions, types [B, T]) with every image reduced by the
    reference and projected, spliced and left-padded here."""
    embeds, kinds = [], []
    for enc in batch:
        pieces, types, at = [], [], 0
        ids = enc.input_ids
        images_left = list(enc.images)
        text = model.module.decoder.embed_tokens(ids.clamp(min=0)).double()
        for i, t in enumerate(ids.tolist()):
            if t != IMAGE_TOKEN:
                continue
            pieces.append(text[at:i])
            types += [T_] * (i - at)
            hidden, probs, keys = tower_reference(model, images_left.pop(0)[None])
            reduced, gap = zip_reference(hidden[0], probs[0], keys[0], tokens, with_cls=True)
            assert gap > 1e-6, "near tie in the reference: choose other test data"
            pieces.append(model.module.projector(reduced).double())
            types += [V_] * reduced.shape[0]
            at = i + 1
        pieces.append(text[at:])
        types += [T_] * (len(ids) - at)
        embeds.append(torch.cat(pieces))
        kinds.append(types)
    t = max(len(k) for k in kinds)
    x = torch.zeros(len(batch), t, embeds[0].shape[1], dtype=torch.float64)
    ty = torch.full((len(batch), t), P_, dtype=torch.long)
    pos = torch.zeros(len(batch), t, dtype=torch.long)
    for b, (e, k) in enumerate(zip(embeds, kinds, strict=True)):
        x[b, t - len(k):], ty[b, t - len(k):] = e, torch.tensor(k)
        pos[b, t - len(k):] = torch.arange(len(k))
    return SimpleNamespace(embeds=x, positions=pos), ty


# ---- tests ------------------------------------------------------------------------------------


def test_published_splits_and_budgets():
    assert [split(n) for n in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert crop_shares(640, 5) == [128] * 5 and crop_shares(160, 5) == [32] * 5
    assert crop_shares(10, 3) == [4, 3, 3]
    assert VisionZip().image_tokens(576) == 64
    assert VisionZip(budget=640).image_tokens(2880) == 640
    assert VisionZip(budget=64).image_tokens(36) == 36
    assert VisionZip(budget=192).describe() == "visionzip(budget=192)"
    for bad in (0, -3, True, 2.5, "64"):
        with pytest.raises(ConfigError):
            VisionZip(budget=bad).validate(8)


@pytest.mark.parametrize("budget", [13, 16, 24, 35])  # 36: every patch, test_method_defaults
@pytest.mark.parametrize("case", ["two-images", "batch"])
def test_visual_tokens_and_logits_match_reference(demo, images, budget, case):
    batch = [two_image_prompt(demo, images)] if case == "two-images" else batch_prompts(demo, images)
    demo.set_method(VisionZip(budget=budget))
    prepared = demo.prepare(batch)
    ref_in, types = reference_inputs(demo, batch, budget)
    assert torch.equal(prepared.types.long(), types)
    visual = types == V_
    # the visual tokens entering the language model (kept and merged sets included)
    assert_rows_close(prepared.embeds, ref_in.embeds, visual)
    with torch.no_grad():
        ours = demo.hidden_states(prepared)
    ref, _ = reference_decoder(demo, ref_in, types)
    assert_rows_close(ours, ref, types != P_)
    logits = demo.logits(batch[0])
    n = int((types[0] != P_).sum())
    torch.testing.assert_close(logits.double(), reference_head(demo, ref[0, -n:]), **TOL)
    if budget < 36:  # not vacuous: the reduction changes the answer's logits
        demo.set_method(Vanilla())
        assert (demo.logits(batch[0])[-1] - logits[-1]).abs().max() > 1e-3


def test_class_token_is_kept_first_when_the_view_has_it(demo, images):
    """With the class token's features (`cls_features`, what LLaVA passes), it takes one
    dominant slot as in VisionZip's code (dominant = class token + dominant - 1 patches)."""
    pixels = torch.stack([demo.encode("x", [im]).images[0] for im in images[:2]])
    hidden, probs, keys = tower_reference(demo, pixels)
    view = ImageView(hidden[:, 1:], probs[:, :, 0, 1:], keys[:, :, 1:], cls_features=hidden[:, 0])
    for tokens in (12, 20, 35):  # 36 of 36: every patch as it is (test_method_defaults)
        ours = VisionZip(budget=2 * tokens).reduce_image(view)
        assert ours.shape == (2, tokens, hidden.shape[-1])
        for c in range(2):
            ref, gap = zip_reference(hidden[c], probs[c], keys[c], tokens, with_cls=True)
            assert gap > 1e-9
            torch.testing.assert_close(ours[c], ref, **TOL)
            torch.testing.assert_close(ours[c, 0], hidden[c, 0], rtol=0, atol=0)


def test_tower_returns_the_select_layers_class_attention_and_keys(demo, images):
    """What VisionZip reads comes back from the tower itself: asked for, the class token's
    attention and the keys of the layer that outputs the select hidden state; not asked
    for, none (and the same hidden states)."""
    pixels = torch.stack([demo.encode("x", [im]).images[0] for im in images[:2]])
    hidden, probs, keys = tower_reference(demo, pixels)
    indices = demo.config.vision_hidden_indices
    with torch.no_grad():
        asked = demo.module.vision(pixels.float(), indices, class_attention=True)
        plain = demo.module.vision(pixels.float(), indices)
    (ours,) = asked.hidden_states
    torch.testing.assert_close(ours.double(), hidden, **TOL)
    torch.testing.assert_close(asked.attention.double(), probs[:, :, 0], **TOL)
    torch.testing.assert_close(asked.keys.double(), keys, **TOL)
    assert plain.attention is None and plain.keys is None
    torch.testing.assert_close(plain.hidden_states[0], ours, rtol=0, atol=0)


def test_crops_share_an_images_budget():
    """An anyres image's budget is spread over its crops; each crop is reduced alone."""
    g = torch.Generator().manual_seed(0)
    c, n, w, h, d = 5, 40, 16, 4, 8
    attn = torch.rand(c, h, n, generator=g).softmax(-1)
    view = ImageView(torch.randn(c, n, w, generator=g, dtype=torch.float64), attn,
                     torch.randn(c, h, n, d, generator=g, dtype=torch.float64))
    even = VisionZip(budget=60).reduce_image(view)
    assert even.shape == (5, 12, w)
    for i in range(c):
        torch.testing.assert_close(even[i], zip_crop(view.features[i], attn[i], view.keys[i], None, 12))
    uneven = VisionZip(budget=62).reduce_image(view)
    assert uneven.shape == (1, 62, w)
    assert torch.equal(uneven[0, :13], zip_crop(view.features[0], attn[0], view.keys[0], None, 13))
    assert torch.equal(uneven[0, -12:], zip_crop(view.features[4], attn[4], view.keys[4], None, 12))


def test_generation_with_cache_equals_recomputation(demo, images):
    batch = batch_prompts(demo, images)
    demo.set_method(VisionZip(budget=16))
    got = cached_tokens(demo, batch, 8)
    for enc, tokens in zip(batch, got, strict=True):
        assert tokens == recomputed_tokens(demo, enc, 8)


def test_padded_batch_equals_one_by_one(demo, images):
    batch = batch_prompts(demo, images)
    demo.set_method(VisionZip(budget=20))
    with torch.no_grad():
        prepared = demo.prepare(batch)
        together = demo.hidden_states(prepared)
        for row, enc in enumerate(batch):
            alone_in = demo.prepare([enc])
            alone = demo.hidden_states(alone_in)
            n = alone.shape[1]
            assert torch.equal(prepared.types[row, -n:], alone_in.types[0])
            assert_rows_close(together[row, -n:], alone[0], alone_in.types[0] != P_)


def test_flop_counter_agrees_with_analytic_count(demo, images):
    enc = two_image_prompt(demo, images)
    method = VisionZip(budget=16)
    demo.set_method(method)
    prepared = demo.prepare([enc])
    measured = counted_flops(demo, prepared, method)
    c = demo.config.text
    analytic = sequence_flops(c, method, prepared.types[0])
    assert abs(measured - analytic) <= 0.02 * analytic
    report = demo.flops(enc)
    assert report["tflops"] * 1e12 == pytest.approx(analytic, rel=1e-12)
    assert report["n_visual"] == 32
    n_text = int((prepared.types[0] == T_).sum())
    # the closed form from an unreduced image's count: image_tokens (16 of its 36)
    assert decoder_flops(c, method, n_text, 36) == decoder_flops(c, Vanilla(), n_text, 16)
    vanilla = counted_flops(demo, demo.prepare([enc], reduce_images=False), Vanilla())
    assert report["vanilla_tflops"] * 1e12 == pytest.approx(vanilla, rel=0.02)
    assert measured < 0.7 * vanilla
