"""One method spec, three text forms: the command line's options, lmms-eval's model_args and
the benchmark scripts' method entries (scripts/bench_methods.py, scripts/eval_methods.py)
must build the same method, and refuse the same mistakes (shortv/methods/spec.py).

The expected methods are written from the demo card's facts (ranking [7, 6, 2, 5, 4, 3, 0,
1], N = 4, 8 layers) and the methods' documented defaults (FastV k=2, r=0.5)."""

from __future__ import annotations

import pytest

import shortv
from shortv.cli import build_parser
from shortv.cli.options import method_for, spec_of
from shortv.eval.lmms import BadModelArgs, ShortVLMM
from shortv.methods import VTW, FastV, PDrop, ShortV, VisionZip, compose
from shortv.methods.spec import MethodSpec, parse_entry
from shortv.ranking import fitted_method
from tests.cli_runner import run_main

DEMO = "llava-tiny-demo"
LAYERS = 8
PAPER_LAYERS = (2, 5, 6, 7)  # the first 4 of the demo card's ranking, sorted

# (command-line options, model_args, method entry, the method they ask for)
SAME_SPECS = [
    (["--method", "shortv"], "method=shortv", "shortv", ShortV(PAPER_LAYERS)),
    (["--method", "shortv+fastv", "--k", "3"], "method=shortv+fastv,k=3", "shortv+fastv k=3",
     compose(ShortV(PAPER_LAYERS), FastV(k=3, r=0.5))),
    (["--method", "fastv", "--r", "0.25"], "method=fastv,r=0.25", "fastv r=0.25", FastV(k=2, r=0.25)),
    (["--method", "vtw", "--k", "5"], "method=vtw,k=5", "vtw k=5", VTW(k=5)),
    (["--method", "visionzip", "--budget", "20"], "method=visionzip,budget=20", "visionzip budget=20",
     VisionZip(budget=20)),
]


def cli_method(options: list[str]):
    """The method `shortv flops` counts for these options (the one `shortv chat` loads)."""
    args = build_parser().parse_args(["flops", DEMO, *options])
    return method_for(args, LAYERS, shortv.zoo.card(DEMO))


def lmms_method(model_args: str):
    """The method of the model lmms-eval makes from `--model_args`."""
    lmm = ShortVLMM.create_from_arg_string(f"pretrained={DEMO},device=cpu,{model_args}")
    return lmm.model.method


def entry_method(entry: str):
    """The method a benchmark script runs for this entry of its --methods."""
    card = shortv.zoo.card(DEMO)
    return fitted_method(parse_entry(entry, card, LAYERS), LAYERS, card)


@pytest.mark.parametrize("options,model_args,entry,expected", SAME_SPECS, ids=[s[2] for s in SAME_SPECS])
def test_every_front_end_builds_the_same_method(options, model_args, entry, expected):
    fitted = expected.for_layers(LAYERS)
    assert cli_method(options) == fitted
    assert entry_method(entry) == fitted
    assert lmms_method(model_args) == fitted


def test_command_line_options_are_a_plain_spec():
    args = build_parser().parse_args(["flops", DEMO, "--method", "shortv+fastv", "--k", "3",
                                      "--ranking", "lc.json", "--n-frozen", "2",
                                      "--param", "fastv.r=0.75"])
    assert spec_of(args) == MethodSpec(names=("shortv", "fastv"), n_frozen=2, ranking="lc.json", k=3,
                                       params={"fastv.r": "0.75"})


def test_the_last_of_repeated_parameters_wins():
    """"lam" and "pdrop.lam" name one field: the one given last counts, as on the command line."""
    assert cli_method(["--method", "pdrop", "--param", "lam=0.3", "--param", "pdrop.lam=0.6",
                       "--param", "lam=0.9"]) == PDrop(lam=0.9).for_layers(LAYERS)
    assert entry_method("pdrop lam=0.3 pdrop.lam=0.6") == PDrop(lam=0.6).for_layers(LAYERS)


def test_a_script_entry_freezes_the_cards_layers_of_a_cut_decoder():
    """A decoder cut to its first 6 layers (bench_methods.py --layers 6): ShortV freezes the
    card's N first layers of the ranking that are within it: 7 and 6 are passed over, so
    2, 5, 4 and 3."""
    card = shortv.zoo.card(DEMO)
    assert fitted_method(parse_entry("shortv", card, 6), 6, card) == ShortV((2, 3, 4, 5)).for_layers(6)


@pytest.mark.parametrize("options,model_args,entry,message", [
    (["--method", "vtw", "--budget", "20"], "method=vtw,budget=20", "vtw budget=20",
     "is for methods with a token budget, not vtw"),
    (["--method", "vanilla+fastv"], "method=vanilla+fastv", "vanilla+fastv",
     "vanilla cannot be composed with other methods"),
    (["--method", "fastv+nope"], "method=fastv+nope", "fastv+nope", "unknown method 'nope'"),
])
def test_every_front_end_refuses_the_same_mistakes(options, model_args, entry, message, capsys):
    code, _, err = run_main(["flops", DEMO, *options], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(shortv.ConfigError, match=message):
        entry_method(entry)
    with pytest.raises(BadModelArgs, match=message):
        lmms_method(model_args)


def test_a_bad_script_entry_says_what_is_wrong():
    with pytest.raises(shortv.ConfigError, match="parameters are NAME=VALUE"):
        entry_method("fastv k")
    with pytest.raises(shortv.ConfigError, match="budget=many is not an integer"):
        entry_method("visionzip budget=many")
