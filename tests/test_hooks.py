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
    recomputed_with_hooks,
    reweighting,
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
    stream = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
    assert sorted(POINTS) == sorted([*stream, "attn_pattern", "vision.resid_post", "projector_out"])
    _, cache = demo.run_with_cache(demo.encode("Hi"), layers=[0])
    assert sorted(name for name, _ in cache.keys()) == sorted(stream)  # the rest only when asked
    with pytest.raises(InputError, match="needs an input with an image"):
        demo.run_with_cache(demo.encode("Hi"), names=["vision.resid_post"])


def test_attention_pattern_equals_transformers_eager_attentions(hf_pair, images):
    """attn_pattern[i] is transformers' eager `output_attentions[i]` (per head, every query
    row over every key), and asking for it leaves the logits as they are."""
    hf, model = hf_pair
    enc = model.encode("Describe this picture.", [images[1]])
    logits, cache = model.run_with_cache(enc, names=["attn_pattern"])
    ids = hf_input_ids(enc.input_ids, hf.config.image_token_id, hf_tokens_per_image(hf.config))
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, pixel_values=enc.images[0][None] if enc.images[0].dim() == 3
                     else enc.images[0], output_attentions=True)
    finally:
        hf.set_attn_implementation("sdpa")
    for i in range(model.num_layers):
        torch.testing.assert_close(cache["attn_pattern", i][0], out.attentions[i][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, model.logits(enc), atol=1e-5, rtol=1e-5)


def test_attention_pattern_under_fastv_and_changed_by_a_hook(demo, images):
    """From layer k on the dropped positions are absent as keys and as rows; each present
    row sums to 1 over the present keys. A hook that returns another pattern is used."""
    k = 2
    batch = batch_prompts(demo, images)
    demo.set_method(FastV(k=k, r=0.5))
    logits, cache = demo.run_with_cache(batch, names=["attn_pattern"], layers=[k])
    pattern, present = cache["attn_pattern", k], cache.present["attn_pattern", k]
    sums = pattern.sum(dim=-1)  # [B, H, T]
    torch.testing.assert_close(sums[present[:, None, :].expand_as(sums)],
                               torch.ones_like(sums[present[:, None, :].expand_as(sums)]))
    assert bool((pattern[~present[:, None, :, None].expand_as(pattern)] == 0).all())
    assert bool((pattern.transpose(-1, -2)[~present[:, None, :, None].expand_as(pattern)] == 0).all())
    same = demo.run_with_hooks(batch, {("attn_pattern", k): lambda p, types: p})
    torch.testing.assert_close(same, logits, atol=1e-9, rtol=0)

    def to_first_key(p, types):  # every row attends to its sequence's first real token only
        first = (types != P_).long().argmax(dim=1)
        out = torch.zeros_like(p)
        for b in range(p.shape[0]):
            out[b, :, :, first[b]] = 1.0
        return out

    assert not torch.allclose(demo.run_with_hooks(batch, {("attn_pattern", k): to_first_key}), logits,
                              atol=1e-4)


def steering(layer: int, scale: float, width: int):
    vector = torch.linspace(-1.0, 1.0, width, dtype=torch.float64) * scale

    def add(x, types):
        return x + (types != P_)[..., None] * vector.to(x.dtype)
    return {("resid_post", layer): add}


@pytest.mark.parametrize("method", [Vanilla(), ShortV((2, 5))], ids=["vanilla", "shortv"])
def test_generation_with_hooks_equals_recomputation(demo, images, method):
    """Hooks fire at the prefill and at every decode step with the KV cache: the greedy
    tokens are those of recomputing the whole sequence with the same hooks each step, for
    a padded batch and alone, and they differ from the unhooked answer."""
    demo.set_method(method)
    hooks = {**steering(3, 2.0, demo.config.text.hidden_size),
             ("mlp_out", 1): lambda x, types: x.masked_fill((types == V_)[..., None], 0.0)}
    prompts = ["What is this?", "Describe both pictures."]
    pictures = [[images[0]], images[1:3]]
    got = demo.generate(prompts, pictures, max_new_tokens=5, hooks=hooks)
    plain = demo.generate(prompts, pictures, max_new_tokens=5)
    for prompt, pics, result in zip(prompts, pictures, got, strict=True):
        enc = demo.encode(prompt, pics)
        expected = recomputed_with_hooks(demo, enc, hooks, 5)
        if result.finish_reason == "eos":  # the answer ends at EOS, which it leaves out
            expected = expected[: expected.index(demo.require_tokenizer().eos_id)]
        assert result.token_ids == expected
    assert [r.token_ids for r in got] != [r.token_ids for r in plain]
    alone = demo.chat(prompts[0], pictures[0], max_new_tokens=5, hooks=hooks)
    assert alone == got[0].text
    assert "".join(demo.chat(prompts[0], pictures[0], max_new_tokens=5, hooks=hooks, stream=True)) == alone


def test_generation_with_hooks_on_a_compiled_model_says_it_runs_eager(demo, images):
    def never(*args, **kwargs):
        raise AssertionError("the compiled step ran with hooks")

    demo.module._compiled_step = never
    try:
        with pytest.warns(UserWarning, match="runs the decode step eager"):
            text = demo.chat("What is this?", [images[0]], max_new_tokens=3,
                             hooks=steering(2, 1.0, demo.config.text.hidden_size))
    finally:
        demo.module._compiled_step = None
    assert text == demo.chat("What is this?", [images[0]], max_new_tokens=3,
                             hooks=steering(2, 1.0, demo.config.text.hidden_size))


@pytest.mark.parametrize("method", [Vanilla(), ShortV((2, 5))], ids=["vanilla", "shortv"])
def test_decode_attention_pattern_is_the_recomputed_last_row(demo, images, method):
    """At every decode step an attn_pattern hook sees [B, H, 1, T] over the whole sequence
    so far, in the padded batch's coordinates: each row, without its padding, is the last
    row of the pattern that recomputing that sequence alone with the same hook gives, and
    what the hook returns steers the answer as it steers the recomputation."""
    demo.set_method(method)
    layers = (2, 4)  # ShortV((2, 5)) freezes layer 2's visual rows, not the new token's
    seen: dict[int, list] = {layer: [] for layer in layers}
    hooks = {("attn_pattern", layer): reweighting(seen[layer], 0.05) for layer in layers}
    prompts = ["What is this?", "Describe both pictures."]
    pictures = [[images[0]], images[1:3]]
    n = 4
    got = demo.generate(prompts, pictures, max_new_tokens=n, hooks=hooks)
    plain = demo.generate(prompts, pictures, max_new_tokens=n)
    assert [r.token_ids for r in got] != [r.token_ids for r in plain]
    assert [call.shape[-1] for call in seen[2]] == [seen[2][0].shape[-1] + k for k in range(n)]
    _, types = prepared_and_types(demo, [demo.encode(p, im) for p, im in zip(prompts, pictures, strict=True)])
    for row, (prompt, pics, result) in enumerate(zip(prompts, pictures, got, strict=True)):
        enc = demo.encode(prompt, pics)
        alone_seen: dict[int, list] = {layer: [] for layer in layers}
        alone = {("attn_pattern", layer): reweighting(alone_seen[layer], 0.05) for layer in layers}
        expected = recomputed_with_hooks(demo, enc, alone, len(result.token_ids))
        assert result.token_ids == expected[: len(result.token_ids)]
        pad = int((types[row] == P_).sum())
        for layer in layers:
            calls = seen[layer][: len(result.token_ids)]
            # recomputation's k-th pass records its prefix's last row
            for k, call in enumerate(calls):
                assert bool((call[row, :, :, :pad] == 0).all())
                torch.testing.assert_close(call[row, :, :, pad:], alone_seen[layer][k][0],
                                           atol=1e-5, rtol=1e-5)


def test_decode_attention_pattern_under_fastv_hides_the_dropped_keys(demo, images):
    """Under FastV a decode step's pattern is zero exactly at the prompt positions the
    prefill's layer does not hold (from layer k on: the dropped visual tokens; everywhere:
    padding), sums to 1, and gives every generated token weight."""
    k = 2
    prompts = ["What is this?", "Describe both pictures in detail, left then right, with colors.",
               "hello there, what color is the sky today?"]
    pictures = [[images[0]], images[1:3], []]
    demo.set_method(FastV(k=k, r=0.5))
    _, cache = demo.run_with_cache([demo.encode(p, im) for p, im in zip(prompts, pictures, strict=True)],
                                   names=["resid_pre"], layers=[1, 3])
    seen: dict[int, list] = {1: [], 3: []}

    def recorder(record):
        return lambda p, types: record.append((p.clone(), types.clone()))

    hooks = {("attn_pattern", i): recorder(seen[i]) for i in seen}
    demo.generate(prompts, pictures, max_new_tokens=3, hooks=hooks)
    dropped = ~cache.present["resid_pre", 3] & (cache.types != P_)
    assert bool(dropped.any())
    for layer in seen:
        held = cache.present["resid_pre", layer]
        t0 = held.shape[1]
        decode_calls = [(p, t) for p, t in seen[layer] if p.shape[2] == 1]
        assert len(decode_calls) == 2
        for p, types in decode_calls:
            assert torch.equal(types[:, :t0], cache.types) and bool((types[:, t0:] == T_).all())
            assert torch.equal(p[:, :, 0, :t0] != 0, held[:, None, :].expand(-1, p.shape[1], -1))
            assert bool((p[:, :, 0, t0:] > 0).all())
            torch.testing.assert_close(p.sum(dim=-1), torch.ones_like(p.sum(dim=-1)))



def test_a_composition_freezes_the_kept_and_hides_the_dropped(demo, images):
    """ShortV + FastV: from layer k the dropped visual positions are absent; in a frozen
    layer the kept visual rows have zero updates; VTW hides every visual position."""
    k, frozen = 2, (5, 6)
    batch = batch_prompts(demo, images)
    prepared, types = prepared_and_types(demo, batch)
    dropped = fastv_dropped(demo, prepared, types, k, 0.5)
    demo.set_method(shortv.compose(ShortV(frozen), FastV(k=k, r=0.5)))
    _, cache = demo.run_with_cache(batch, names=["attn_out", "mlp_out"])
    kept_visual = (types == V_) & ~dropped
    for i in range(demo.num_layers):
        present = cache.present["attn_out", i]
        assert torch.equal(present, (types != P_) & (~dropped if i >= k else True))
        if i in frozen:
            assert bool((cache["attn_out", i][kept_visual] == 0).all())
            assert bool((cache["mlp_out", i][kept_visual] == 0).all())
    demo.set_method(shortv.VTW(k=3))
    _, cache = demo.run_with_cache(batch, names=["resid_post"], layers=[2, 3])
    assert bool((cache.present["resid_post", 2] & (types == V_)).any())
    assert not bool((cache.present["resid_post", 3] & (types == V_)).any())


def test_vision_tower_and_projector_points_equal_transformers(hf_pair, images):
    """vision.resid_post[i] is transformers' vision tower hidden_states[i + 1] (the output
    of layer i, class token first) and projector_out is what its language model receives at
    the image positions; both are read-only."""
    hf, model = hf_pair
    enc = model.encode("Describe this picture.", [images[1]])
    names = ["vision.resid_post", "projector_out", "resid_pre"]
    _, cache = model.run_with_cache(enc, names=names, layers=[0])
    ids = hf_input_ids(enc.input_ids, hf.config.image_token_id, hf_tokens_per_image(hf.config))
    pixels = enc.images[0][None] if enc.images[0].dim() == 3 else enc.images[0]
    with torch.no_grad():
        tower = hf.model.vision_tower(pixels, output_hidden_states=True)
        out = hf(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
    depth = len(model.module.vision.layers)
    assert sorted(i for name, i in cache.keys() if name == "vision.resid_post") == list(range(depth))
    for i in range(depth):
        torch.testing.assert_close(cache["vision.resid_post", i], tower.hidden_states[i + 1],
                                   atol=1e-5, rtol=1e-5)
    visual = cache.types[0] == V_
    assert torch.equal(cache.present["projector_out", 0][0], visual)
    torch.testing.assert_close(cache["projector_out", 0][0][visual], out.hidden_states[0][0][visual],
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(cache["projector_out", 0][0][visual], cache["resid_pre", 0][0][visual])
    with pytest.raises(ConfigError, match="projector_out has one layer"):
        model.run_with_hooks(enc, {("projector_out", 1): lambda x, t: x})
    with pytest.raises(ConfigError, match="vision tower's layers"):
        model.run_with_hooks(enc, {("vision.resid_post", depth): lambda x, t: x})


def test_vision_hooks_change_what_the_decoder_sees(demo):
    """Patching the vision tower's last layer, or the projector's output, with another
    image's gives that image's logits; zeroing the projector's output is zeroing the visual
    rows of the first layer's input. The vision-feature cache does not hide the hooks."""
    prompt = "What color is the shape?"
    a = demo.encode(prompt, [random_rgb(60, 40, seed=3)])
    b = demo.encode(prompt, [random_rgb(60, 40, seed=4)])
    last = demo.module.vision_depth - 1
    _, cache_b = demo.run_with_cache(b, names=["vision.resid_post", "projector_out"])
    expected = demo.logits(b)
    demo.cache_features(64)
    try:
        demo.logits(a)  # a's features now in the cache
        tower = demo.run_with_hooks(
            a, {("vision.resid_post", last): lambda x, t: cache_b["vision.resid_post", last]})
        projector = demo.run_with_hooks(a, {("projector_out", 0): lambda x, t: cache_b["projector_out", 0]})
    finally:
        demo.cache_features(None)
    torch.testing.assert_close(tower, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(projector, expected, atol=1e-9, rtol=0)
    zeroed = demo.run_with_hooks(a, {("projector_out", 0): lambda x, t: torch.zeros_like(x)})
    visual_off = demo.run_with_hooks(
        a, {("resid_pre", 0): lambda x, t: x.masked_fill((t == V_)[..., None], 0)})
    torch.testing.assert_close(zeroed, visual_off, atol=1e-12, rtol=0)


def test_attention_pattern_of_chosen_queries(demo, images):
    """queries= keeps the pattern rows of the chosen positions only: [B, H, Q, T], the
    same rows as the whole pattern."""
    batch = batch_prompts(demo, images)
    _, whole = demo.run_with_cache(batch, names=["attn_pattern"], layers=[3])
    _, some = demo.run_with_cache(batch, names=["attn_pattern"], layers=[3], queries=[-1, 5])
    full = whole["attn_pattern", 3]
    picked = some["attn_pattern", 3]
    assert picked.shape == (*full.shape[:2], 2, full.shape[-1])
    assert torch.equal(picked, full[:, :, [full.shape[2] - 1, 5]])
    with pytest.raises(ConfigError, match="query position"):
        demo.run_with_cache(batch, names=["attn_pattern"], layers=[3], queries=[10_000])
