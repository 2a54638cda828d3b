"""`shortv.analysis`: the built-in interventions against the same change written out as a
hook (or as the method it equals), and the logit lens against an explicit float64 final
norm and head on the cached residual stream."""

from __future__ import annotations

import pytest
import torch

import shortv
from shortv import ConfigError, FastV, ShortV, TokenType, Vanilla
from shortv.analysis import logit_lens, mean_ablate, patch, steer, zero_ablate

from .reference import P_, V_, batch_prompts, random_rgb, reference_head


@pytest.fixture
def demo(demo_model: shortv.LLaVA):
    demo_model.set_method(Vanilla())
    yield demo_model
    demo_model.set_method(Vanilla())


def test_zero_ablating_visual_updates_is_shortv(demo, images):
    batch = batch_prompts(demo, images)
    frozen = (0, 3)
    hooks = {(point, i): zero_ablate(TokenType.VISUAL) for i in frozen for point in ("attn_out", "mlp_out")}
    hooked = demo.run_with_hooks(batch, hooks)
    demo.set_method(ShortV(frozen))
    torch.testing.assert_close(hooked, demo.run_with_hooks(batch, {}), atol=1e-9, rtol=0)


def test_mean_ablate_patch_and_steer_equal_the_change_written_out(demo, images):
    batch = batch_prompts(demo, images)
    width = demo.config.text.hidden_size

    def written_mean(x, types):  # each sequence's visual rows replaced by their mean
        out = x.clone()
        for b in range(x.shape[0]):
            rows = types[b] == V_
            if bool(rows.any()):
                out[b, rows] = x[b, rows].mean(dim=0)
        return out

    ablated = demo.run_with_hooks(batch, {("resid_mid", 2): mean_ablate(TokenType.VISUAL)})
    torch.testing.assert_close(ablated, demo.run_with_hooks(batch, {("resid_mid", 2): written_mean}),
                               atol=1e-9, rtol=0)
    given = torch.randn(width, dtype=torch.float64)

    def written_positions(x, types):  # the real tokens at positions 3 and 4 take `given`
        out = x.clone()
        at = torch.arange(x.shape[1])
        out[(types != P_) & (at >= 3) & (at < 5)] = given
        return out

    torch.testing.assert_close(
        demo.run_with_hooks(batch, {("resid_post", 1): mean_ablate(positions=[3, 4], mean=given)}),
        demo.run_with_hooks(batch, {("resid_post", 1): written_positions}), atol=1e-9, rtol=0)
    vector = torch.linspace(-1, 1, width, dtype=torch.float64)
    torch.testing.assert_close(
        demo.run_with_hooks(batch, {("resid_pre", 4): steer(vector, 0.5, TokenType.TEXT)}),
        demo.run_with_hooks(batch, {("resid_pre", 4): lambda x, t: x + 0.5 * (t == int(TokenType.TEXT))[
            ..., None] * vector}), atol=1e-9, rtol=0)


def test_patching_the_image_rows_from_another_run(demo):
    """Patching every row of resid_pre at layer 0 gives the other run's logits; patching
    the visual rows only gives the same here (the prompts differ only in their image)."""
    prompt = "What color is the shape?"
    a = demo.encode(prompt, [random_rgb(60, 40, seed=3)])
    b = demo.encode(prompt, [random_rgb(60, 40, seed=4)])
    _, cache_b = demo.run_with_cache(b, names=["resid_pre"], layers=[0])
    expected = demo.logits(b)
    torch.testing.assert_close(demo.run_with_hooks(a, {("resid_pre", 0): patch(cache_b, "resid_pre", 0)}),
                               expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(
        demo.run_with_hooks(a, {("resid_pre", 0): patch(cache_b, "resid_pre", 0, TokenType.VISUAL)}),
        expected, atol=1e-9, rtol=0)
    longer = demo.encode(prompt + " Answer briefly.", [random_rgb(60, 40, seed=3)])
    with pytest.raises(ConfigError, match="same length"):
        demo.run_with_hooks(longer, {("resid_pre", 0): patch(cache_b, "resid_pre", 0)})


def test_logit_lens_reads_each_layer_through_the_final_norm_and_head(demo, images):
    enc = demo.encode("What is this?", [images[0]])
    lens = logit_lens(demo, enc, top_k=3)
    _, cache = demo.run_with_cache(enc, names=["resid_post"])
    for li, layer in enumerate(lens.layers):
        probs = reference_head(demo, cache["resid_post", layer][0]).softmax(dim=-1)
        top = probs.topk(3, dim=-1)
        assert torch.equal(lens.token_ids[li], top.indices)
        torch.testing.assert_close(lens.probs[li].double(), top.values, atol=1e-6, rtol=1e-6)
    assert int(lens.token_ids[-1, -1, 0]) == int(demo.logits(enc)[-1].argmax())  # the last layer: the model's
    assert bool(lens.present.all())
    visual_only = logit_lens(demo, enc, layers=[1, 5], types=[TokenType.VISUAL], top_k=1)
    assert visual_only.layers == [1, 5]
    assert torch.equal(visual_only.present[0], lens.types == V_)
    data = visual_only.as_dict(demo)
    assert {row["type"] for layer in data["layers"] for row in layer["positions"]} == {"visual"}
    with pytest.raises(ConfigError):
        logit_lens(demo, enc, top_k=0)


def test_logit_lens_under_fastv_marks_dropped_positions_absent(demo, images):
    enc = demo.encode("What is this?", [images[0]])
    demo.set_method(FastV(k=2, r=0.5))
    lens = logit_lens(demo, enc, top_k=1)
    visual = lens.types == V_
    n_visual = int(visual.sum())
    for li, layer in enumerate(lens.layers):
        held = int(lens.present[li][visual].sum())
        assert held == (n_visual if layer < 2 else round(n_visual * 0.5))
