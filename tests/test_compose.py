"""Composition: ShortV's frozen layers with a token-wise method (`shortv.compose`,
`load(n_frozen=..., method=...)`, `--method shortv+fastv`) equals applying both rules in an
explicit reference; FLOPs count both; bad compositions are refused with a clear message."""

from __future__ import annotations

import json

import pytest
import torch

import shortv
from shortv.flops import decoder_flops, sequence_flops
from shortv.methods import VTW, Compose, FastV, ShortV, Vanilla, compose

from .cli_runner import run_main
from .reference import (
    T_,
    V_,
    _attention_probs,
    _rms,
    assert_rows_close,
    base_mask,
    batch_prompts,
    counted_flops,
    prepared_and_types,
    select_dropped,
    two_image_prompt,
)

FROZEN = (1, 3, 4, 6)


@pytest.fixture
def demo(demo_model: shortv.LLaVA):
    """The fp64 demo model (tests/conftest.py), back to vanilla after every test."""
    demo_model.set_method(Vanilla())
    yield demo_model
    demo_model.set_method(Vanilla())


def reference(model, prepared, types, frozen: tuple[int, ...], hidden_keys: dict[int, torch.Tensor]):
    """Explicit float64 decoder: in a `frozen` layer visual rows keep their input (ShortV),
    and hidden_keys[i] [B, T] are keys no query of layer i may attend to (a drop). Returns
    (output, inputs of every layer)."""
    c = model.config.text
    x, mask, inputs = prepared.embeds.double(), base_mask(types), []
    visual = (types == V_)[..., None]
    for i, w in enumerate(model.module.decoder.layers):
        inputs.append(x)
        allowed = mask & ~hidden_keys[i][:, None, :] if i in hidden_keys else mask
        probs, v = _attention_probs(model, i, x, allowed, prepared.positions)
        b, _, t, _ = probs.shape
        y = x + (probs @ v).transpose(1, 2).reshape(b, t, -1) @ w.attn.o_proj.weight.double().T
        hm = _rms(y, w.mlp_norm.weight, c.rms_norm_eps)
        gate = torch.nn.functional.silu(hm @ w.mlp.gate_proj.weight.double().T)
        y = y + (gate * (hm @ w.mlp.up_proj.weight.double().T)) @ w.mlp.down_proj.weight.double().T
        x = torch.where(visual, x, y) if i in frozen else y
    return x, inputs


@pytest.mark.parametrize("k,r", [(2, 0.5), (4, 0.75)])
@pytest.mark.parametrize("case", ["two-images", "batch"])
def test_shortv_plus_fastv_equals_both_rules(demo, images, k, r, case):
    batch = [two_image_prompt(demo, images)] if case == "two-images" else batch_prompts(demo, images)
    prepared, types = prepared_and_types(demo, batch)
    # FastV's ranking: the last query of layer k-1, on the input that ShortV's freezing gives.
    _, inputs = reference(demo, prepared, types, FROZEN, {})
    probs, _ = _attention_probs(demo, k - 1, inputs[k - 1], base_mask(types), prepared.positions)
    dropped, gap = select_dropped(probs[:, :, -1].mean(dim=1), types, r)
    assert gap > 1e-6
    ref, _ = reference(demo, prepared, types, FROZEN, {i: dropped for i in range(k, demo.num_layers)})
    method = compose(ShortV(FROZEN), FastV(k=k, r=r))
    with torch.no_grad():
        ours = demo.hidden_states(prepared, method=method.for_layers(demo.num_layers))
    survivors = (types == T_) | ((types == V_) & ~dropped)
    assert_rows_close(ours, ref, survivors)
    # frozen alone or FastV alone differ: the reference really tests both rules
    with torch.no_grad():
        fastv_only = demo.hidden_states(prepared, method=FastV(k=k, r=r))
    assert not torch.allclose(fastv_only[types == T_].double(), ref[types == T_], atol=1e-3)


def test_load_and_compose_agree(demo):
    """n_frozen= with method= composes them (the API form of --method shortv+fastv)."""
    model = shortv.load("llava-tiny-demo", n_frozen=4, method=FastV(k=2, r=0.5))
    assert isinstance(model.method, Compose)
    layers = shortv.ranking.resolve_frozen_layers(8, n_frozen=4, default_ranking=(7, 6, 2, 5, 4, 3, 0, 1))
    assert model.method == Compose((ShortV(layers), FastV(k=2, r=0.5)))


def test_flops_count_both(demo, images):
    """The composition's count is the frozen layers' saving on the tokens FastV kept, and
    torch.utils.flop_counter agrees within 2%."""
    c = demo.config.text
    both = compose(ShortV(FROZEN), FastV(k=2, r=0.5))
    n_text, n_visual = 20, 72
    kept = round(0.5 * n_visual)
    expected = 0
    for layer in range(c.layers):
        n_vis = n_visual if layer < 2 else kept
        n = n_text + n_vis
        queries = n - n_vis if layer in FROZEN else n
        expected += shortv.flops.layer_flops(c, queries, n)
    # FastV's ranking in layer 1: the last query's Q row and its scores over every key
    expected += 2 * c.heads * c.head_dim * (c.hidden_size + n_text + n_visual)
    assert decoder_flops(c, both, n_text, n_visual) == expected
    prepared, _ = prepared_and_types(demo, [two_image_prompt(demo, images)])
    measured = counted_flops(demo, prepared, both)
    analytic = sequence_flops(c, both, prepared.types[0])
    assert abs(measured - analytic) <= 0.02 * analytic
    assert analytic < min(sequence_flops(c, ShortV(FROZEN), prepared.types[0]),
                          sequence_flops(c, FastV(k=2, r=0.5), prepared.types[0]))


def test_bad_compositions_are_refused():
    with pytest.raises(shortv.ConfigError, match="both drop tokens"):
        compose(FastV(), VTW(k=3))
    with pytest.raises(shortv.ConfigError, match="both freeze"):
        compose(ShortV((1,)), ShortV((2,)))
    assert compose(Vanilla(), FastV()).for_layers(8) == FastV()
    assert compose().for_layers(8) == Vanilla()


@pytest.mark.parametrize("argv,message", [
    (["--method", "shortv+fastv+vtw"], "cannot compose"),
    (["--method", "fastv+fastv"], "names a method twice"),
    (["--method", "vanilla+fastv"], "vanilla cannot be composed"),
    (["--method", "shortv+nope"], "unknown method 'nope'"),
    (["--method", "fastv", "--param", "fastv.q=1"], "no parameter 'q'"),
    (["--method", "fastv", "--param", "r=abc"], "not a valid value"),
    (["--method", "fastv", "--param", "r"], "expected NAME=VALUE"),
    (["--method", "vtw", "--budget", "64"], "--budget is for methods with a token budget"),
])
def test_cli_method_spec_errors(argv, message, capsys):
    code, _, err = run_main(["flops", "llava-v1.5-7b", *argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_composition_flops(capsys):
    code, out, err = run_main(["flops", "llava-v1.5-7b", "--method", "shortv+fastv", "--param",
                               "fastv.r=0.75", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    c = shortv.zoo.get_card("llava-v1.5-7b")
    expected = decoder_flops(c.config.text, compose(ShortV(tuple(sorted(c.ranking[:c.n_frozen]))),
                                                    FastV(k=2, r=0.75)), 64, 576) / 1e12
    assert report["tflops"] == pytest.approx(expected)


@pytest.mark.parametrize("spec", [None, "shortv"])
def test_cli_flops_counts_n_frozen_without_a_ranking(spec, capsys):
    """A card without a ranking: --n-frozen N alone is counted with any N layers (the
    count does not depend on which) and says a ranking is needed to run it; composed with
    a token-dropping method it does depend on which, so the ranking is asked for."""
    argv = ["flops", "llava-v1.6-mistral-7b", "--n-frozen", "3", "--json"]
    code, out, err = run_main(argv + (["--method", spec] if spec else []), capsys)
    assert code == 0, err
    report = json.loads(out)
    c = shortv.zoo.get_card("llava-v1.6-mistral-7b").config.text
    assert report["tflops"] == pytest.approx(decoder_flops(c, ShortV((0, 1, 2)), 64, 2880) / 1e12)
    assert report["method"] == "shortv(n_frozen=3)" and "shortv lc" in report["note"]
    code, _, err = run_main([*argv, "--method", "shortv+fastv"], capsys)
    assert code == 2 and "shortv lc llava-v1.6-mistral-7b --data" in err


def test_bench_names_a_composition_as_the_cli_spells_it(capsys):
    """`shortv bench --method shortv+fastv` reports `shortv+fastv_ms`, not an internal name."""
    assert compose(ShortV((1,)), FastV(k=2, r=0.5)).name == "shortv+fastv"
    code, out, err = run_main(["bench", "llava-tiny-demo", "--method", "shortv+fastv", "--n-text", "8",
                               "--n-visual", "32", "--repeats", "1", "--warmup", "0", "--device", "cpu"],
                              capsys)
    assert code == 0, err
    assert ", shortv+fastv " in out and "compose" not in out
