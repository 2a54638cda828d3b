"""Hook points of the decoder layers (`shortv.models.taps`): `run_with_cache` and
`run_with_hooks` against transformers' hidden states, against the methods' own rules
written independently (ShortV's freeze, FastV's drop), and against a second run (patching).
"""

from __future__ import annotations

import pytest
import torch

import shortv
from shortv import ConfigError, FastV, HookPoint, InputError, ShortV, Vanilla

from .reference import (
    P_,
    T_,
    V_,
    batch_prompts,
    fastv_dropped,
    hf_input_ids,
    hf_tokens_per_image,
    prepared_and_types,
    random_rgb,
)

POINTS = [p.value for p in HookPoint]


@pytest.fixture
def demo(demo_model: shortv.LLaVA):
    demo_model.set_method(Vanilla())
    yield demo_model
    demo_model.set_method(Vanilla())


@pytest.fixture(scope="module")
def hf_pair(hf_llava):
    """transformers' LlavaForConditionalGeneration and shortv's model on the same checkpoint."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(hf_llava, dtype=torch.float32).eval()
    return hf, shortv.load(hf_llava, device="cpu", dtype=torch.float32)


def test_residual_stream_equals_transformers_hidden_states(hf_pair, images):
    """resid_pre[i] is transformers' hidden_states[i] and resid_post[i] its
    hidden_states[i + 1] (the last one before the final norm, which transformers applies)."""
    hf, model = hf_pair
    enc = model.encode("Describe this picture.", [images[1]])
    logits, cache = model.run_with_cache(enc, names=["resid_pre", "resid_post"])
    ids = hf_input_ids(enc.input_ids, hf.config.image_token_id, hf_tokens_per_image(hf.config))
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=enc.images[0][None] if enc.images[0].dim() == 3
                 else enc.images[0], output_hidden_states=True)
    hidden = out.hidden_states
    n = model.num_layers
    for i in range(n):
        torch.testing.assert_close(cache["resid_pre", i][0], hidden[i][0], atol=1e-5, rtol=1e-5)
        post = cache["resid_post", i][0]
        if i == n - 1:
            post = model.module.decoder.norm(post)
        torch.testing.assert_close(post, hidden[i + 1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, out.logits[0], atol=1e-4, rtol=1e-4)
    assert bool(cache.present["resid_pre", 0].all())


def test_updates_add_up_and_frozen_rows_are_zero(demo, images):
    """attn_out and mlp_out are exactly the residual updates; under ShortV a frozen layer's
    visual rows have zero updates and an unchanged residual."""
    frozen = (2, 5)
    demo.set_method(ShortV(frozen))
    batch = batch_prompts(demo, images)
    _, cache = demo.run_with_cache(batch)
    types = cache.types
    for i in range(demo.num_layers):
        pre, attn, mid = cache["resid_pre", i], cache["attn_out", i], cache["resid_mid", i]
        mlp, post = cache["mlp_out", i], cache["resid_post", i]
        torch.testing.assert_close(mid, pre + attn, atol=1e-12, rtol=0)
        torch.testing.assert_close(post, mid + mlp, atol=1e-12, rtol=0)
        visual = types == V_
        if i in frozen:
            assert bool((attn[visual] == 0).all()) and bool((mlp[visual] == 0).all())
            assert torch.equal(post[visual], pre[visual])
        else:
            assert bool((attn[visual] != 0).any())
        assert bool((post[types == P_] == 0).all())  # padding is absent
        assert torch.equal(cache.present["resid_post", i], types != P_)


def test_zeroing_visual_updates_equals_shortv(demo, images):
    """Zeroing the visual rows of attn_out and mlp_out at layers F is ShortV(F)."""
    frozen = (1, 4, 6)
    batch = batch_prompts(demo, images)

    def zero_visual(x, types):
        return x.masked_fill((types == V_)[..., None], 0.0)

    hooks = {(point, i): zero_visual for i in frozen for point in ("attn_out", "mlp_out")}
    hooked = demo.run_with_hooks(batch, hooks)
    demo.set_method(ShortV(frozen))
    with torch.no_grad():
        prepared = demo.prepare(batch)
        expected = demo.module.decoder.head(demo.hidden_states(prepared))
    torch.testing.assert_close(hooked, expected, atol=1e-9, rtol=1e-9)
    demo.set_method(Vanilla())
    assert not torch.allclose(demo.run_with_hooks(batch, {}), expected, atol=1e-4)


def test_no_hooks_is_the_plain_forward(demo, images):
    enc = demo.encode("What is this?", [images[0]])
    assert torch.equal(demo.run_with_hooks(enc, {}), demo.logits(enc))
    demo.set_method(FastV(k=2, r=0.5))
    assert torch.equal(demo.run_with_hooks(enc, {}), demo.logits(enc))


def test_fastv_dropped_tokens_are_absent_from_layer_k_on(demo, images):
    """Under FastV the hooks stay in sequence coordinates: from layer k on, the positions of
    the tokens an independent reference says FastV drops are absent, every other one is
    present at its own position."""
    k, r = 2, 0.5
    batch = batch_prompts(demo, images)
    prepared, types = prepared_and_types(demo, batch)
    dropped = fastv_dropped(demo, prepared, types, k, r)
    assert bool(dropped.any())
    demo.set_method(FastV(k=k, r=r))
    _, cache = demo.run_with_cache(batch, names=["resid_pre"])
    for i in range(demo.num_layers):
        expected = (types != P_) & ~dropped if i >= k else types != P_
        assert torch.equal(cache.present["resid_pre", i], expected), f"layer {i}"
        assert bool((cache["resid_pre", i][~expected] == 0).all())
    # the kept tokens' states at layer k are their states entering layer k
    vanilla = demo.run_with_cache(batch, names=["resid_pre"], layers=[k])[1]
    kept = (types != P_) & ~dropped
    torch.testing.assert_close(cache["resid_pre", k][kept], vanilla["resid_pre", k][kept], atol=1e-9, rtol=0)


def test_patching_resid_pre_of_layer_0_gives_the_other_images_logits(demo):
    """Activation patching: the first layer's input of another image's run replaces this
    run's, and the logits become that image's."""
    prompt = "What color is the shape?"
    a = demo.encode(prompt, [random_rgb(60, 40, seed=3)])
    b = demo.encode(prompt, [random_rgb(60, 40, seed=4)])
    _, cache_b = demo.run_with_cache(b, names=["resid_pre"], layers=[0])
    patched = demo.run_with_hooks(a, {("resid_pre", 0): lambda x, types: cache_b["resid_pre", 0]})
    torch.testing.assert_close(patched, demo.logits(b), atol=1e-9, rtol=0)
    assert not torch.allclose(demo.logits(a), demo.logits(b), atol=1e-4)


def test_cache_options_and_views(demo, images):
    enc = demo.encode("What is this?", [images[0]])
    _, cache = demo.run_with_cache(enc, names=["mlp_out"], layers=[3], device="cpu", dtype=torch.float16)
    assert cache.keys() == [(HookPoint.MLP_OUT, 3)]
    assert cache["mlp_out", 3].dtype == torch.float16 and cache["mlp_out", 3].shape[0] == 1
    assert ("mlp_out", 3) in cache and ("mlp_out", 2) not in cache
    visual = cache.of_type(("mlp_out", 3), shortv.TokenType.VISUAL)
    assert visual.shape == (int((cache.types == V_).sum()), demo.config.text.hidden_size)
    assert cache.of_type(("mlp_out", 3), shortv.TokenType.TEXT).shape[0] == int((cache.types == T_).sum())


@pytest.mark.parametrize("hooks,error", [
    ({("resid_pree", 0): lambda x, t: None}, ConfigError),
    ({("resid_pre", 99): lambda x, t: None}, ConfigError),
    ({("resid_pre", True): lambda x, t: None}, ConfigError),
    ({("resid_pre", 0): "not a function"}, ConfigError),
    ({"resid_pre": lambda x, t: None}, ConfigError),
])
def test_bad_hooks_are_one_clear_error(demo, images, hooks, error):
    enc = demo.encode("What is this?", [images[0]])
    with pytest.raises(error):
        demo.run_with_hooks(enc, hooks)


def test_bad_inputs_and_names(demo):
    with pytest.raises(InputError):
        demo.run_with_hooks("a raw prompt", {})
    with pytest.raises(InputError):
        demo.run_with_cache([])
    with pytest.raises(ConfigError, match="unknown hook point"):
        demo.run_with_cache(demo.encode("Hi"), names=["attn_pattern_typo"])
    assert sorted(POINTS) == sorted(["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"])
