"""VisionZip against a reference that does not use the code under test.

Reference: the demo's CLIP tower run here explicitly in float64 (own patch embedding,
LayerNorms, softmax(QKᵀ/√d)·V, quick_gelu MLP), recording the select layer's attention and
keys; VisionZip's rule applied with plain Python sorting and loops (dominant = highest
class-token attention summed over heads; the rest merged into uniform-stride targets by
cosine similarity of head-averaged keys, target + mean of its assigned patches); the
projector, the splice and `reference_decoder` (tests/reference.py) then give the visual
tokens entering the language model and the logits.

LLaVA-NeXT: VisionZip's own anyres path transcribed from the authors' code (named at
`authors_tower`), run on transformers' LlavaNextForConditionalGeneration in float64, against
the visual tokens shortv's prepared sequence carries, on a tiny random checkpoint with 7×7
patches per tile (wide, tall and square images).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import shortv
from shortv import IMAGE_TOKEN, ConfigError, TokenType, Vanilla
from shortv.flops import decoder_flops, sequence_flops
from shortv.methods.base import ImageView
from shortv.methods.spec import MethodSpec, build, parse_entry
from shortv.methods.visionzip import VisionZip, crop_shares, split, zip_crop

from . import checkpoints
from . import reference as ref
from .data import image
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


def test_a_budget_below_the_crop_count_keeps_class_tokens_only():
    """A share of 0 keeps nothing of its crop, a share of 1 its class token: `budget`
    tokens in all, in either layout."""
    g = torch.Generator().manual_seed(1)
    c, n, w, h, d = 5, 16, 8, 2, 4
    view = ImageView(torch.randn(c, n, w, generator=g), torch.rand(c, h, n, generator=g).softmax(-1),
                     torch.randn(c, h, n, d, generator=g), cls_features=torch.randn(c, w, generator=g),
                     tile_grid=(2, 2))
    for budget in (1, 3, 4):
        for layout in ("authors", "crops"):
            got = VisionZip(budget=budget, layout=layout).reduce_image(view).flatten(0, 1)
            assert torch.equal(got, view.cls_features[:budget])


def test_layout_option_describe_and_spec():
    assert VisionZip().layout == "authors" and VisionZip().describe() == "visionzip(budget=64)"
    assert VisionZip(32, layout="crops").describe() == "visionzip(budget=32, layout=crops)"
    with pytest.raises(ConfigError, match="layout"):
        VisionZip(layout="grid")
    want = VisionZip(budget=20, layout="crops")
    for params in ({"layout": "crops"}, {"visionzip.layout": "crops"}):
        spec = MethodSpec(names=("visionzip",), budget=20, params=params)
        assert build(spec)["method"] == want
    assert build(parse_entry("visionzip budget=20 layout=crops", None, 8))["method"] == want
    with pytest.raises(ConfigError, match="layout"):
        build(MethodSpec(names=("visionzip",), params={"layout": "grid"}))


def test_without_a_tile_grid_the_layouts_agree():
    """LLaVA-1.5 and unmerged crops (no `tile_grid`): both layouts are the crops in order."""
    g = torch.Generator().manual_seed(2)
    c, n, w, h, d = 3, 25, 8, 2, 4
    view = ImageView(torch.randn(c, n, w, generator=g), torch.rand(c, h, n, generator=g).softmax(-1),
                     torch.randn(c, h, n, d, generator=g), cls_features=torch.randn(c, w, generator=g))
    for budget in (12, 30, 31):
        assert torch.equal(VisionZip(budget).reduce_image(view),
                           VisionZip(budget, layout="crops").reduce_image(view))


# ---- LLaVA-NeXT: VisionZip's own layout, transcribed ---------------------------------------
#
# From dvlab-research/VisionZip, commit 3151f6df4fca36a4cd1c985e5956e725b1f9ad02:
# - visionzip/clip_encoder.py `CLIPVisionTower_VisionZip.forward` (its tensor branch: all
#   crops of all images in one batch);
# - visionzip/utils.py `CLIPAttention_forward` (the metric `raw_key_states.mean(1)`: the
#   keys, before any scaling, averaged over heads) and `apply_info` (r = 1 at layers[-2] only:
#   the metric of the same layer as `attentions[-2]` and `hidden_states[-2]`);
# - visionzip/main.py `visionzip` (`dominant_num = dominant - 1`);
# - visionzip/llava_arch.py `encode_images_visionzip_multi`, `restore_image_features_sorted`
#   and `prepare_inputs_labels_for_multimodal_visionzip` (image_aspect_ratio anyres,
#   mm_patch_merge_type spatial_unpad, an image of several crops).
# Two changes: the tower's outputs at layers[-2] (hidden states, attention probabilities,
# keys) come from `tower_reference` above, an explicit float64 CLIP (transformers' eager
# CLIP takes its softmax in float32); the constants 576 and 24 (336-pixel tiles of 14-pixel
# patches) become the tiny tower's side * side and side. The projector is transformers'
# (LlavaNextForConditionalGeneration's multi_modal_projector, in float64).

NEXT_SIZES = {"wide": (60, 25), "tall": (25, 60), "square": (90, 90)}  # 3×1, 1×3, 2×2 tiles
MARGIN = 1e-9  # smallest ranking / similarity gap: float64 rounding cannot change a choice
NEXT_TOL = dict(atol=1e-10, rtol=1e-10)


def authors_tower(model, images: torch.Tensor, dominant_num: int, contextual_num: int):
    """CLIPVisionTower_VisionZip.forward: (hidden_states_save [C, 1 + dominant_num +
    contextual_num, W], all_indices [C, 1 + dominant_num]) and the smallest gap of its
    top-k and argmax choices (for the near-tie check, not the authors')."""
    hidden_states, attn_weights, raw_key_states = tower_reference(model, images)
    metric = raw_key_states.mean(1)

    ## Dominant Visual Tokens
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype,
                                         device=topk_indices.device), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool, device=metric.device).scatter_(
        1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(
        hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])

    ### Filter
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1),
                                        metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)

    ## Contextual Visual Tokens
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=metric_normalized.device)[
        :contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1],
                                                                    device=metric_normalized.device),
                                                       target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                                 dtype=hidden_states_filtered.dtype, device=metric_normalized.device)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1],
                                                                         device=hidden_states_filtered.device),
                                                            target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    return hidden_states_save, all_indices, choice_margin(cls_attention_sum, similarity, dominant_num)


def choice_margin(scores: torch.Tensor, similarity: torch.Tensor, k: int) -> float:
    """The smallest gap between the k-th and (k+1)-th score of a crop and between a merged
    patch's two most similar targets: a near tie could let rounding choose otherwise."""
    ranked = scores.sort(dim=1, descending=True).values
    gap = float((ranked[:, k - 1] - ranked[:, k]).min()) if 0 < k < scores.shape[1] else math.inf
    if similarity.shape[2] > 1:
        top2 = similarity.topk(2, dim=2).values
        gap = min(gap, float((top2[..., 0] - top2[..., 1]).min()))
    return gap


def authors_restore(image_feature: torch.Tensor, cur_keep_idx: torch.Tensor, width: int, height: int,
                    side: int) -> torch.Tensor:
    """restore_image_features_sorted (576 → side * side, 24 → side)."""
    num_img, total_patches, feature_dim = image_feature.shape
    num_keep = cur_keep_idx.shape[1]
    num_extra = total_patches - num_keep  # (0 would take every token below; not tested)
    cur_keep_idx_sorted, _ = cur_keep_idx.sort(dim=1)
    cur_keep_idx_sorted_restore = cur_keep_idx_sorted[:, 1:] - 1
    restored_features = torch.zeros((num_img, side * side, feature_dim), device=image_feature.device,
                                    dtype=image_feature.dtype)
    mask = torch.zeros(num_img, side * side, dtype=torch.bool, device=image_feature.device)
    mask.scatter_(1, cur_keep_idx_sorted_restore, True)
    kept_features = image_feature[:, 1:num_keep, :]
    restored_features[mask] = kept_features.reshape(-1, feature_dim)
    assert width * height == restored_features.shape[0], "width * height must equal num_img"
    restored_features = restored_features.view(height, width, side, side, feature_dim)
    restored_features = restored_features.permute(0, 2, 1, 3, 4).contiguous()
    restored_features = restored_features.view(height, side, width * side, feature_dim)
    restored_features = restored_features.view(height * side, width * side, feature_dim)
    # (the code builds image_newline_expanded here and never uses it)
    grid_with_newline = restored_features
    mask = mask.view(height, width, side, side)
    mask = mask.permute(0, 2, 1, 3).contiguous()
    mask = mask.view(height * side, width * side)
    mask_all = mask
    image_feature_select = grid_with_newline[mask_all]
    raw_img_feature_merge = image_feature[:, -num_extra:, ].reshape(-1, feature_dim)
    cls_img_feature_merge = image_feature[:, 0, ]
    return torch.cat([image_feature_select, cls_img_feature_merge, raw_img_feature_merge])


def next_geometry(model, size: tuple[int, int]) -> tuple[int, int, int]:
    """(num_patch_width, num_patch_height, side) of an image of `size`: the original's
    get_anyres_image_grid_shape (tests/reference.py) and the patches per tile side."""
    c = model.config.vision
    width, height = ref.get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, c.image_size)
    return width, height, c.image_size // c.patch_size


@torch.no_grad()
def authors_next_tokens(model, hf, pixels: torch.Tensor, size: tuple[int, int], dominant: int,
                        contextual: int):
    """One anyres image's visual tokens [T, D] as `prepare_inputs_labels_for_multimodal_visionzip`
    splices them (spatial_unpad, several crops) after `visionzip(model, dominant, contextual)`,
    with the selection's margin."""
    # encode_images_visionzip_multi
    features, keep_idx, margin = authors_tower(model, pixels, dominant - 1, contextual)
    image_feature = hf.model.multi_modal_projector(features)
    base_image_feature = image_feature[0]
    image_feature = image_feature[1:]
    cur_keep_idx = keep_idx[1:]
    num_patch_width, num_patch_height, side = next_geometry(model, size)
    image_feature = authors_restore(image_feature, cur_keep_idx, num_patch_width, num_patch_height, side)
    return torch.cat((base_image_feature, image_feature), dim=0), margin


@torch.no_grad()
def uneven_reference(model, hf, pixels: torch.Tensor, size: tuple[int, int], shares: list[int]):
    """shortv's rule where the crops' shares differ (the authors' code has one setting for
    every crop): each crop alone through `authors_tower` with its share's published split
    (contextual = round(share · 10/64)), then the layout of restore_image_features_sorted
    written tile by tile: each tile's dominant patches at their places on the tile grid, read
    row by row over the whole grid; the tiles' class tokens; their contextual tokens."""
    cols, rows, side = next_geometry(model, size)
    crops, margin = [], math.inf
    for c, share in enumerate(shares):
        contextual = round(share * 10 / 64)
        features, keep_idx, m = authors_tower(model, pixels[c:c + 1], share - contextual - 1, contextual)
        margin = min(margin, m)
        crops.append((hf.model.multi_modal_projector(features[0]), keep_idx[0].sort().values[1:] - 1,
                      contextual))
    grid = torch.zeros(rows * side, cols * side, crops[0][0].shape[-1], dtype=torch.float64)
    filled = torch.zeros(rows * side, cols * side, dtype=torch.bool)
    tiles = crops[1:]
    for t, (tokens, patches, _) in enumerate(tiles):
        r, c = divmod(t, cols)
        for k, p in enumerate(patches.tolist()):
            grid[r * side + p // side, c * side + p % side] = tokens[1 + k]
            filled[r * side + p // side, c * side + p % side] = True
    return torch.cat([crops[0][0], grid[filled], torch.stack([t[0][0] for t in tiles]),
                      *(t[0][-t[2]:] for t in tiles)]), margin


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory, sp_model: Path) -> Path:
    """A tiny LLaVA-NeXT with 4-pixel patches: 7×7 = 49 patches per 28-pixel tile."""
    return checkpoints.make_llava(tmp_path_factory.mktemp("vz-next"), sp_model, next_=True,
                                  vision=dict(patch_size=4))


@pytest.fixture(scope="module")
def hf_next64(next_dir: Path):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(next_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module", params=["transformers", "original"])
def next_model(request, next_dir: Path, tmp_path_factory) -> shortv.LLaVA:
    """shortv on that checkpoint in float64 (the reference's precision: no near tie can
    choose differently), from transformers' layout and from original LLaVA-NeXT's (tower
    inside, mm_patch_merge_type spatial_unpad)."""
    directory = next_dir
    if request.param == "original":
        directory = checkpoints.to_original(next_dir, tmp_path_factory.mktemp("vz-next-orig"), tower="inside")
    model = shortv.load(directory, device="cpu", dtype=torch.float64)
    assert model.config.patch_merge_type == "spatial_unpad" and model.config.image_aspect_ratio == "anyres"
    return model


def shortv_visual_tokens(model: shortv.LLaVA, method, encoded) -> torch.Tensor:
    """The visual rows of the sequence shortv hands to the language model [T, D]."""
    model.set_method(method)
    try:
        prepared = model.prepare([encoded])
    finally:
        model.set_method(Vanilla())
    return prepared.embeds[0, prepared.types[0] == int(TokenType.VISUAL)]


def counted_as(model: shortv.LLaVA, method: VisionZip, encoded, tokens: torch.Tensor) -> bool:
    """Whether `image_tokens` (what the analytic FLOPs count) gives the reduced image's
    count from vanilla's."""
    vanilla = shortv_visual_tokens(model, Vanilla(), encoded).shape[0]
    return method.image_tokens(vanilla) == tokens.shape[0] == method.tokens


def next_image(model: shortv.LLaVA, shape: str):
    """(encoded prompt, its image's pixels [C, 3, 28, 28], the image's size)."""
    size = NEXT_SIZES[shape]
    encoded = model.encode("look <image> here", [image(size)], template=False)
    return encoded, encoded.images[0].double(), size


@pytest.mark.parametrize("shape", list(NEXT_SIZES))
@pytest.mark.parametrize(("dominant", "contextual"), [(17, 3), (30, 5)])  # 20 and 35 per crop
def test_next_tokens_match_the_authors_layout(next_model, hf_next64, shape, dominant, contextual):
    """Every visual token, in order: base crop [class, dominant, contextual]; the tiles'
    dominant patches in raster order of the tile grid (no unpadding, no row-end token);
    the tiles' class tokens; the tiles' contextual tokens."""
    encoded, pixels, size = next_image(next_model, shape)
    assert split(dominant + contextual) == (dominant, contextual)  # the authors' per-crop setting
    want, margin = authors_next_tokens(next_model, hf_next64, pixels, size, dominant, contextual)
    assert margin > MARGIN, "near tie in the reference: choose other test data"
    budget = pixels.shape[0] * (dominant + contextual)
    assert want.shape[0] == budget
    got = shortv_visual_tokens(next_model, VisionZip(budget=budget), encoded)
    torch.testing.assert_close(got, want, **NEXT_TOL)
    assert counted_as(next_model, VisionZip(budget=budget), encoded, got)
    # The crop-order layout, kept as an option: the same per-crop tokens, crop by crop.
    features, _, _ = authors_tower(next_model, pixels, dominant - 1, contextual)
    with torch.no_grad():
        per_crop = hf_next64.model.multi_modal_projector(features).flatten(0, 1)
    crops_order = shortv_visual_tokens(next_model, VisionZip(budget=budget, layout="crops"), encoded)
    torch.testing.assert_close(crops_order, per_crop, **NEXT_TOL)
    assert (crops_order - got).abs().max() > 1e-2, "the two layouts differ on this image"


@pytest.mark.parametrize("budget", [90, 94])  # 23+23+22+22 (contextual 4, 4, 3, 3); 24+24+23+23
def test_next_uneven_shares_follow_the_layout_crop_by_crop(next_model, hf_next64, budget):
    encoded, pixels, size = next_image(next_model, "wide")
    shares = crop_shares(budget, pixels.shape[0])
    assert len(set(shares)) == 2
    want, margin = uneven_reference(next_model, hf_next64, pixels, size, shares)
    assert margin > MARGIN, "near tie in the reference: choose other test data"
    got = shortv_visual_tokens(next_model, VisionZip(budget=budget), encoded)
    torch.testing.assert_close(got, want, **NEXT_TOL)
    assert counted_as(next_model, VisionZip(budget=budget), encoded, got)


def test_next_budget_below_the_crops_and_full_budget(next_model, hf_next64):
    """Budget 3 for a 5-crop image: the first three crops' class tokens. A budget of every
    patch: vanilla's tokens (unpadded, row-end tokens), in both layouts."""
    encoded, pixels, _ = next_image(next_model, "square")
    hidden, _, _ = tower_reference(next_model, pixels)
    with torch.no_grad():
        cls = hf_next64.model.multi_modal_projector(hidden[:, 0])
    torch.testing.assert_close(shortv_visual_tokens(next_model, VisionZip(budget=3), encoded),
                               cls[:3], **NEXT_TOL)
    vanilla = shortv_visual_tokens(next_model, Vanilla(), encoded)
    for layout in ("authors", "crops"):
        full = shortv_visual_tokens(next_model, VisionZip(pixels.shape[0] * 49, layout=layout), encoded)
        assert torch.equal(full, vanilla)


def test_next_flops_count_the_reduced_tokens(next_model):
    encoded, _, _ = next_image(next_model, "wide")
    next_model.set_method(VisionZip(budget=80))
    try:
        report = next_model.flops(encoded)
        types = next_model.prepare([encoded]).types[0]
    finally:
        next_model.set_method(Vanilla())
    assert report["n_visual"] == 80 == int((types == int(TokenType.VISUAL)).sum())
    n_text = int((types == int(TokenType.TEXT)).sum())
    c = next_model.config.text
    assert report["tflops"] * 1e12 == pytest.approx(decoder_flops(c, Vanilla(), n_text, 80), rel=1e-12)
