"""The command line, on the embedded demo: `python -m shortv` as a subprocess for the real
entry point (a handful of runs: each pays for importing torch), `shortv.cli.main` in
process for the many error cases. Answers are compared with the Python API's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shortv

from .cli_runner import CPU, assert_one_line_error, run_main
from .data import TABLE

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "weights" / "llava-tiny-demo"
IMAGE = DEMO / "example.png"
PAPER_MODELS = {"llava-v1.5-7b": 19, "llava-v1.5-13b": 24, "llava-v1.6-vicuna-7b": 19,
                "llava-v1.6-vicuna-13b": 24}
# Cards without a published ranking: (layers, KV heads).
UNRANKED_MODELS = {"llava-v1.6-mistral-7b": (32, 8), "llava-v1.6-34b": (60, 8),
                   # Qwen's published config.json: num_hidden_layers, num_key_value_heads.
                   "qwen2-vl-2b-instruct": (28, 2), "qwen2-vl-7b-instruct": (28, 4),
                   "qwen2.5-vl-3b-instruct": (36, 2), "qwen2.5-vl-7b-instruct": (28, 4)}


def shortv_cli(*args: str, stdin: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SHORTV_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "shortv", *args], input=stdin, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)



@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    return shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)


# ---- subprocess: the real entry point ---------------------------------------------------------


def test_zoo_table():
    run = shortv_cli("zoo")
    assert run.returncode == 0, run.stderr
    table, _, note = run.stdout.strip().partition("\n\n")  # the table, then a note
    rows = table.splitlines()
    assert len(rows) == 1 + 11  # header + one row per card
    for name in [*PAPER_MODELS, *UNRANKED_MODELS, "llava-tiny-demo"]:
        assert sum(row.split()[0] == name for row in rows) == 1
    for name in UNRANKED_MODELS:  # no published ranking: the table says so and how to get one
        assert "none (run shortv lc)" in next(row for row in rows if row.split()[0] == name)
    assert "shortv lc" in note and "--ranking" in note


def test_zoo_json():
    run = shortv_cli("zoo", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)  # one JSON object, nothing else on stdout
    models = {m["name"]: m for m in report["models"]}
    assert set(models) == {*PAPER_MODELS, *UNRANKED_MODELS, "llava-tiny-demo"}
    for name, n in PAPER_MODELS.items():
        assert models[name]["n_frozen"] == n and len(models[name]["ranking"]) == n
        assert models[name]["layers"] == (40 if "13b" in name else 32)
        assert models[name]["ranking_origin"] == "paper"
    for name, (layers, kv_heads) in UNRANKED_MODELS.items():
        assert models[name]["ranking"] == [] and models[name]["n_frozen"] is None
        assert models[name]["ranking_origin"] == "none"
        assert (models[name]["layers"], models[name]["kv_heads"]) == (layers, kv_heads)
    assert models["llava-tiny-demo"]["ranking_origin"] == "shortv lc"
    assert models["llava-tiny-demo"]["local_weights"] is not None
    assert Path(models["llava-tiny-demo"]["local_weights"]).resolve() == DEMO.resolve()


def test_chat_one_shot_prints_what_the_api_answers(demo):
    prompt = "What is unusual about this image?"
    run = shortv_cli("chat", "--model", "llava-tiny-demo", "--image", str(IMAGE), "--prompt", prompt,
                     "--max-new-tokens", "8", *CPU)
    assert run.returncode == 0, run.stderr
    answer = demo.chat(prompt, [IMAGE], max_new_tokens=8)
    assert answer
    assert run.stdout == answer + "\n"
    assert "Traceback" not in run.stderr


def test_chat_interactive_session(demo, tmp_path):
    """Two messages on stdin, then EOF: two answers, the second with the first as history."""
    q1, q2 = "What is this?", "And the color?"
    run = shortv_cli("chat", "--model", "llava-tiny-demo", "--image", str(IMAGE),
                     "--max-new-tokens", "6", *CPU, stdin=f"{q1}\n{q2}\n", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    a1 = demo.chat(q1, [IMAGE], max_new_tokens=6)
    a2 = demo.chat(q2, [IMAGE], history=[(q1, a1)], max_new_tokens=6)
    assert a1 != a2
    out = run.stdout
    assert a1 in out and a2 in out[out.index(a1) + len(a1):], out
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "--model", "no-such-model", "--prompt", "hi"],
        ["chat", "--model", "llava-tiny-demo", "--image", str(DEMO / "config.json"), "--prompt", "hi"],
        ["chat", "--model", "llava-tiny-demo", "--temperature", "-1", "--prompt", "hi"],
    ],
    ids=["missing-model", "not-an-image", "bad-option"],
)
def test_errors_from_the_entry_point(args):
    run = shortv_cli(*args)
    assert_one_line_error(run.returncode, run.stderr)
    assert run.stdout == ""


# ---- in process: the same main() ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "no-such-model"], "no-such-model"),
        (["--model", "llava-tiny-demo", "--image", "/no/such/image.png"], "image.png"),
        (["--model", "llava-tiny-demo", "--image", str(DEMO / "config.json")], "config.json"),
        (["--model", "llava-tiny-demo", "--temperature", "-1"], "--temperature"),
        (["--model", "llava-tiny-demo", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--model", "llava-tiny-demo", "--max-new-tokens", "many"], "--max-new-tokens"),
        (["--model", "llava-tiny-demo", "--top-p", "0"], "--top-p"),
        (["--model", "llava-tiny-demo", "--top-p", "1.5"], "--top-p"),
        (["--model", "llava-tiny-demo", "--method", "bogus"], "--method"),
        (["--model", "CARDLESS", "--n-frozen", "3"], "ranking"),
        (["--model", "CARDLESS", "--method", "shortv"], "n-frozen"),
        (["--model", "llava-tiny-demo", "--k", "2"], "--k"),
        (["--model", "llava-tiny-demo", "--method", "vtw", "--r", "0.5"], "--r"),
        (["--model", "llava-tiny-demo", "--method", "fastv", "--k", "8"], "k=8"),
        (["--model", "llava-tiny-demo", "--frozen-layers", "1,99"], "99"),
        (["--model", "llava-tiny-demo", "--frozen-layers", "1,1"], "twice"),
        (["--model", "llava-tiny-demo", "--n-frozen", "2", "--frozen-layers", "1"], "not both"),
        (["--model", "llava-tiny-demo", "--n-frozen", "9", "--ranking", "0,1,2"], "n_frozen"),
        (["--model", "llava-tiny-demo", "--dtype", "int8"], "--dtype"),
        (["--model", "llava-tiny-demo", "--device", "nonsense"], "nonsense"),
    ],
)
def test_chat_errors_are_one_line(capsys, original_v15, args, needle):
    """CARDLESS: a checkpoint directory, so no zoo card supplies a ranking or an N."""
    args = [str(original_v15) if a == "CARDLESS" else a for a in args]
    code, out, err = run_main(["chat", *args, "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert_one_line_error(code, err)
    assert needle in err
    assert out == ""


def test_missing_command_and_unknown_command(capsys):
    for argv in ([], ["frobnicate"]):
        code, _, err = run_main(argv, capsys)
        assert_one_line_error(code, err)


@pytest.mark.parametrize("argv", [["zoo", "--bogus"], ["flops", "llava-v1.5-7b", "extra", "--bogus"]])
def test_unknown_arguments_name_the_command(capsys, argv):
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err)
    assert err.startswith(f"shortv {argv[0]}: error: unrecognized arguments: ")
    assert f"(see shortv {argv[0]} --help)" in err


@pytest.mark.parametrize(
    ("args", "method"),
    [
        (["--frozen-layers", "1,3"], shortv.ShortV((1, 3))),
        (["--n-frozen", "2", "--ranking", "7,6,5"], shortv.ShortV((6, 7))),
        (["--method", "fastv", "--k", "1", "--r", "0.75"], shortv.FastV(k=1, r=0.75)),
        (["--method", "vtw", "--k", "2"], shortv.VTW(k=2)),
    ],
)
def test_chat_with_a_method_answers_like_the_api(capsys, args, method):
    prompt = "Describe the picture in detail."
    code, out, err = run_main(["chat", "--model", "llava-tiny-demo", "--image", str(IMAGE),
                               "--prompt", prompt, "--max-new-tokens", "10", "--no-stream",
                               *CPU, *args], capsys)
    assert code == 0, err
    model = shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)
    model.set_method(method)
    assert out == model.chat(prompt, [IMAGE], max_new_tokens=10) + "\n"


def test_chat_sampling_options_reach_the_model(capsys, demo):
    prompt = "What is unusual about this image?"
    greedy = demo.chat(prompt, max_new_tokens=10)
    # The demo is trained and confident: find a seed whose sample differs from greedy.
    seed = next(s for s in range(50)
                if demo.chat(prompt, max_new_tokens=10, temperature=2.0, top_p=0.95, seed=s) != greedy)
    options = ["--temperature", "2.0", "--top-p", "0.95", "--seed", str(seed), "--max-new-tokens", "10"]
    code, out, err = run_main(["chat", "--model", "llava-tiny-demo", "--prompt", prompt, *options, *CPU],
                              capsys)
    assert code == 0, err
    want = demo.chat(prompt, max_new_tokens=10, temperature=2.0, top_p=0.95, seed=seed)
    assert out == want + "\n" and want != greedy  # the options reached the model


def test_interactive_exit_word(capsys, monkeypatch, demo):
    lines = iter(["Hello", "", "exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run_main(["chat", "--model", "llava-tiny-demo", "--max-new-tokens", "4",
                               "--no-stream", *CPU], capsys)
    assert code == 0, err
    assert out == "ASSISTANT: " + demo.chat("Hello", max_new_tokens=4) + "\n"


# ---- flops and bench ---------------------------------------------------------------------------


def test_flops_reproduces_the_paper_table(capsys):
    """The CLI's numbers for every cell of the paper's table (typed in, tests/data.py)."""
    for model, method, tflops, percent in TABLE:
        k, r = str(getattr(method, "k", "")), str(getattr(method, "r", ""))
        options = {"vanilla": [], "fastv": ["--k", k, "--r", r], "vtw": ["--k", k],
                   "shortv": ["--n-frozen", str(PAPER_MODELS[model])]}[method.name]
        code, out, err = run_main(["flops", model, "--method", method.name, *options, "--json"], capsys)
        assert code == 0, err
        report = json.loads(out)
        assert round(report["tflops"], 1) == tflops and report["printed_percent"] == percent, (model, method)
        assert report["n_text"] == 64 and report["n_visual"] == (2880 if "v1.6" in model else 576)


def test_flops_text_shows_the_json_percentages(capsys):
    """Every percentage --json gives is the one the text line prints: the paper's (58 % for
    LLaVA-1.5-7B FastV, from 4.9 / 8.5) next to the unrounded ratio's (57 %) where they differ."""
    import re

    for model, method, _, paper_percent in TABLE:
        k, r = str(getattr(method, "k", "")), str(getattr(method, "r", ""))
        options = {"vanilla": [], "fastv": ["--k", k, "--r", r], "vtw": ["--k", k],
                   "shortv": ["--n-frozen", str(PAPER_MODELS[model])]}[method.name]
        argv = ["flops", model, "--method", method.name, *options]
        code, text, err = run_main(argv, capsys)
        assert code == 0, err
        code, out, err = run_main([*argv, "--json"], capsys)
        assert code == 0, err
        report = json.loads(out)
        shown = {int(p) for p in re.findall(r"(\d+)%", text)}
        assert shown == {report["percent"], report["printed_percent"]}, (model, method, text)
        assert paper_percent in shown, (model, method, text)


def test_flops_counts_the_given_tokens(capsys):
    code, out, err = run_main(["flops", "llava-v1.5-7b", "--method", "vtw", "--k", "0",
                               "--n-text", "100", "--n-visual", "576", "--json"], capsys)
    assert code == 0, err
    text_only = json.loads(out)["tflops"]
    code, out, err = run_main(["flops", "llava-v1.5-7b", "--n-text", "100", "--n-visual", "0", "--json"],
                              capsys)
    assert code == 0, err
    assert json.loads(out)["tflops"] == text_only  # VTW at layer 0 == a prompt without the image


def test_bench_on_the_demo_freezes_what_it_says(capsys):
    from shortv.flops import decoder_flops
    from shortv.methods import ShortV

    code, out, err = run_main(["bench", "llava-tiny-demo", "--frozen-layers", "0,3", "--n-text", "8",
                               "--n-visual", "32", "--repeats", "2", "--warmup", "0", "--json", *CPU],
                              capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["method"] == ShortV((0, 3)).describe() and report["layers"] == 8
    assert report["vanilla_ms"] > 0 and report["shortv_ms"] == report["method_ms"] > 0
    assert report["speedup"] == pytest.approx(report["vanilla_ms"] / report["shortv_ms"], rel=1e-3)
    text = shortv.load("llava-tiny-demo", device="cpu").config.text
    want = decoder_flops(text, shortv.Vanilla(), 8, 32) / decoder_flops(text, ShortV((0, 3)), 8, 32)
    assert report["flops_speedup"] == pytest.approx(want, abs=1e-4)


def test_bench_random_weights_slice_ranks_only_its_layers(capsys):
    """The demo card ranks 7,6,2,5,4,3,0,1; a 3-layer slice keeps 2,0,1 in that order."""
    common = ["bench", "llava-tiny-demo", "--random-weights", "--layers", "3", "--n-text", "4",
              "--n-visual", "8", "--repeats", "1", "--warmup", "0", "--json", *CPU]
    code, out, err = run_main([*common, "--n-frozen", "2"], capsys)
    assert code == 0, err
    assert json.loads(out)["method"] == shortv.ShortV((0, 2)).describe()
    code, _, err = run_main([*common, "--n-frozen", "4"], capsys)
    assert_one_line_error(code, err)
    assert "--frozen-layers 0,1,2" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "vanilla"], "compares vanilla"),
        (["--layers", "2"], "--random-weights"),
        (["--random-weights", "--layers", "99", "--n-frozen", "1"], "--layers"),
        (["--n-frozen", "1", "--k", "2"], "--k"),
    ],
)
def test_bench_errors_are_one_line(capsys, args, needle):
    code, out, err = run_main(["bench", "llava-tiny-demo", *args, *CPU], capsys)
    assert_one_line_error(code, err)
    assert needle in err and out == ""
