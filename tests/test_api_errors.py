"""What a new user can get wrong through the Python API and the CLI: each is a
`shortv.ShortVError` with a message that says what to do, never a raw TypeError."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import shortv
from shortv.errors import ConfigError, InputError, ShortVError

from .cli_runner import run_main

REPO = Path(shortv.__file__).resolve().parents[1]
DEMO = REPO / "weights" / "llava-tiny-demo"
IMAGE = DEMO / "example.png"


@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    return shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("call", [
    lambda m: m.chat("Hi", history=["a"]),
    lambda m: m.chat("Hi", history="a"),
    lambda m: m.chat("Hi", history=[("a", 3)]),
    lambda m: m.chat(None),
    lambda m: m.chat(3, [IMAGE]),
    lambda m: m.chat("Hi", images=3),
    lambda m: m.chat("Hi", [3]),
    lambda m: m.chat("Hi", max_new_tokens="5"),
    lambda m: m.chat("Hi", stop=[3]),
    lambda m: m.chat("Hi", top_k=5),
    lambda m: m.chat("Hi", options={"max_new_tokens": 3}),
    lambda m: m.generate("Hi"),
    lambda m: m.generate(["Hi", "Ho"], IMAGE),
    lambda m: m.set_frozen_layers(4),
    lambda m: m.set_frozen_layers("4"),
    lambda m: m.set_frozen_layers([1.5]),
    lambda m: m.set_method("fastv"),
    lambda m: m.set_method(shortv.VTW(k=99)),
    lambda m: m.set_method(shortv.FastV(k="2")),
], ids=["history-str-item", "history-str", "history-bad-reply", "prompt-none", "prompt-int",
        "images-int", "image-int", "max-new-tokens-str", "stop-int", "unknown-option",
        "options-dict", "generate-str", "generate-one-image", "frozen-int", "frozen-str",
        "frozen-float", "method-name", "vtw-k", "fastv-k-str"])
def test_bad_api_arguments_are_shortv_errors(demo, call):
    with pytest.raises(ShortVError) as err:
        call(demo)
    assert str(err.value) and "\n" not in str(err.value)


def test_a_single_image_or_path_is_accepted(demo):
    """images= takes one image (a path or a PIL image) as well as a list."""
    want = demo.chat("What is in this picture?", [IMAGE], max_new_tokens=8)
    assert demo.chat("What is in this picture?", IMAGE, max_new_tokens=8) == want
    assert demo.chat("What is in this picture?", str(IMAGE), max_new_tokens=8) == want
    assert demo.chat("What is in this picture?", Image.open(IMAGE), max_new_tokens=8) == want
    [result] = demo.generate(["What is in this picture?"], [IMAGE], max_new_tokens=8)
    assert result.text == want


def test_options_object_equals_keywords(demo):
    options = shortv.GenerationOptions(max_new_tokens=6, temperature=1.5, seed=3)
    want = demo.chat("Describe it.", [IMAGE], max_new_tokens=6, temperature=1.5, seed=3)
    assert demo.chat("Describe it.", [IMAGE], options=options) == want
    # Keywords override the object's fields.
    assert demo.chat("Describe it.", [IMAGE], options=options, temperature=0.0) == \
        demo.chat("Describe it.", [IMAGE], max_new_tokens=6)


def test_missing_tokenizer_is_named_at_load_and_at_first_use(tmp_path):
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(DEMO, bare)
    for name in ("tokenizer.model", "tokenizer.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="tokenizer.model or tokenizer.json"):
        model = shortv.load(bare, device="cpu")
    with pytest.raises(InputError) as err:
        model.chat("Hi", [IMAGE])
    assert "tokenizer.model" in str(err.value) and str(bare) in str(err.value)
    # It still runs on token ids.
    enc = shortv.Encoded(torch.tensor([1, 450, 2]))
    assert model.logits(enc).shape == (3, model.config.text.vocab_size)



@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_lc_checks_output_paths_before_loading(tmp_path, capsys, monkeypatch, flag):
    """An unwritable --out/--plot is an error before the model is loaded (results would be
    lost at the end of the computation otherwise)."""
    calib = tmp_path / "calib.jsonl"
    calib.write_text(f'{{"image": "{IMAGE}", "prompt": "What is it?"}}\n')

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(shortv, "load", no_loading)
    target = "/nonexistent-folder/x." + ("json" if flag == "--out" else "png")
    code, out, err = run_main(["lc", "llava-tiny-demo", "--data", str(calib), flag, target], capsys)
    assert code == 2 and out == ""
    assert "/nonexistent-folder" in err and "does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["bench", "llava-v1.5-7b", "--random-weights", "--method", "vanilla"],
    ["bench", "llava-v1.5-7b", "--random-weights", "--layers", "2", "--n-frozen", "19"],
    ["bench", "llava-v1.5-7b", "--random-weights", "--method", "vtw", "--k", "40"],
    ["bench", "llava-v1.5-7b", "--layers", "2", "--method", "fastv"],
    ["bench", "llava-v1.5-7b", "--random-weights", "--dtype", "float16", "--device", "nope",
     "--method", "fastv"],
])
def test_bench_validates_before_building(capsys, monkeypatch, args):
    from shortv import bench

    def no_building(*a, **k):
        raise AssertionError("the decoder was built before the arguments were checked")

    monkeypatch.setattr(bench, "random_decoder", no_building)
    monkeypatch.setattr(shortv, "load", no_building)
    code, out, err = run_main(args, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err


def test_small_flops_print_in_a_unit_that_shows_them(capsys):
    code, out, _ = run_main(["flops", "llava-tiny-demo"], capsys)
    assert code == 0
    assert "GFLOPs" in out and "0.0 TFLOPs" not in out


def test_format_flops():
    from shortv.flops import format_flops

    assert format_flops(8.5) == "8.5 TFLOPs"
    assert format_flops(0.0425) == "42.5 GFLOPs"
    assert format_flops(2.5e-5) == "25.0 MFLOPs"


def test_ranking_strings_and_lists():
    from shortv.ranking import load_ranking

    assert load_ranking("31,29, 30") == (31, 29, 30)
    assert load_ranking([3, 1]) == (3, 1)
    with pytest.raises(ConfigError, match="not found"):
        load_ranking("no-such-report.json")


@pytest.mark.parametrize(("change", "needle"), [
    ({"num_hidden_layers": 12}, "num_hidden_layers"),
    ({"num_hidden_layers": 10**12}, "num_hidden_layers"),
    ({"num_hidden_layers": 3.7e38}, "num_hidden_layers"),
    ({"hidden_size": None}, "hidden_size"),
    ({"intermediate_size": 200}, "intermediate_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"vocab_size": -200}, "vocab_size"),
])
def test_mutated_config_is_one_config_error_before_building(tmp_path, change, needle):
    """shortv.load on the demo with one config.json field changed: a ShortVError naming the
    field, raised before the model is built (no unbounded allocation)."""
    import json

    from shortv import loading

    bad = tmp_path / "demo"
    shutil.copytree(DEMO, bad)
    config = json.loads((bad / "config.json").read_text())
    for field, value in change.items():
        if value is None:
            config.pop(field)
        else:
            config[field] = value
    (bad / "config.json").write_text(json.dumps(config))
    built = []
    real_build = loading.build_empty
    loading.build_empty = lambda c: built.append(c) or real_build(c)
    try:
        with pytest.raises(ShortVError) as err:
            shortv.load(bad, device="cpu")
    finally:
        loading.build_empty = real_build
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert built == []
