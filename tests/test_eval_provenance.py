"""An eval result says what produced it, and a rerun never mixes runs: every answer line
and the summary record the run; an answer file is resumed only by the same run, anything
else is one line, exit 2, the file untouched; --overwrite starts afresh; --limit below
what the file holds; scripts/eval_methods.py run twice; the same under torchrun; and the
CLI's --version and --help defaults."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shortv
from shortv.conversation import get_template

from .cli_runner import ENV, REPO, root_cause, run_main, shortv_eval, torchrun

sys.path.insert(0, str(REPO / "scripts"))
import make_demo_eval

DEMO_PATH = str(REPO / "weights" / "llava-tiny-demo")


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 held-out demo questions with answers."""
    return make_demo_eval.write(tmp_path_factory.mktemp("demo-eval"), 6, seed=98)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected_record(method: dict, *, max_new_tokens: int = 24) -> dict:
    """The record the brief asks for, written out by hand."""
    return {
        "model": "llava-tiny-demo",
        "method": method,
        "template": get_template(shortv.zoo.card("llava-tiny-demo").template).name,
        "generation": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": None,
                       "seed": None, "stop": []},
        "dtype": "float32",
        "version": shortv.__version__,
    }


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


# ---- the record ------------------------------------------------------------------------------


@pytest.mark.parametrize("options, method", [
    (["--method", "fastv", "--r", "0.25"],
     {"name": "fastv", "k": 2, "r": 0.25, "description": shortv.FastV(k=2, r=0.25).describe()}),
    (["--method", "shortv+fastv", "--frozen-layers", "3,1"],
     {"name": "shortv+fastv", "parts": [{"name": "shortv", "layers": [1, 3]},
                                        {"name": "fastv", "k": 2, "r": 0.5}],
      "description": shortv.compose(shortv.ShortV((1, 3)), shortv.FastV()).describe()}),
], ids=["fastv", "composed"])
def test_every_line_and_the_summary_record_the_run(eval_set, tmp_path, capsys, options, method):
    answers = tmp_path / "a.jsonl"
    code, summary, err = shortv_eval(eval_set, answers, "--limit", "2", *options, capsys=capsys)
    assert code == 0, err
    want = expected_record(method)
    assert summary["provenance"] == want
    records = lines(answers)
    assert len(records) == 2 and all(r["metadata"] == {"shortv": want} for r in records)


# ---- resume only the same run ----------------------------------------------------------------


@pytest.mark.parametrize("options, old, new", [
    (["--method", "fastv"], "method=vanilla", f"method={shortv.FastV(k=2, r=0.5).describe()}"),
    (["--max-new-tokens", "9"], "generation.max_new_tokens=24", "generation.max_new_tokens=9"),
    (["--dtype", "bfloat16"], "dtype=float32", "dtype=bfloat16"),
], ids=["method", "max-new-tokens", "dtype"])
def test_a_rerun_with_other_settings_is_refused_and_the_file_left_alone(
        eval_set, tmp_path, capsys, options, old, new):
    answers = tmp_path / "a.jsonl"
    assert shortv_eval(eval_set, answers, "--limit", "2", capsys=capsys)[0] == 0
    before = answers.read_bytes()
    code, _, err = shortv_eval(eval_set, answers, *options, capsys=capsys)
    line = one_error_line(code, err)
    assert f"written by a run with {old}, this run has {new}" in line and "--overwrite" in line
    assert answers.read_bytes() == before
    # The same settings resume it.
    code, summary, err = shortv_eval(eval_set, answers, "--limit", "3", capsys=capsys)
    assert code == 0 and summary["answered_now"] == 1 and summary["n"] == 3, err
    assert answers.read_bytes().startswith(before)


def test_a_method_known_only_after_loading_is_checked_before_writing(eval_set, tmp_path, capsys):
    """A checkpoint directory (no zoo card): its method is fitted once it is loaded, and
    checked then, still before anything is written."""
    answers = tmp_path / "a.jsonl"
    base = ["eval", DEMO_PATH, "--questions", str(eval_set), "--answers-out", str(answers),
            "--quiet", "--json", "--max-new-tokens", "8", "--limit", "2"]
    code, _, err = run_main(base, capsys)
    assert code == 0, err
    before = answers.read_bytes()
    code, _, err = run_main([*base, "--method", "vtw"], capsys)
    line = one_error_line(code, err)
    # VTW's k is half the layers, known once the demo's 8 layers are.
    assert f"method=vanilla, this run has method={shortv.VTW(k=4).describe()}" in line
    assert answers.read_bytes() == before


def test_overwrite_starts_afresh(eval_set, tmp_path, capsys):
    answers = tmp_path / "a.jsonl"
    assert shortv_eval(eval_set, answers, "--limit", "2", capsys=capsys)[0] == 0
    code, summary, err = shortv_eval(eval_set, answers, "--limit", "3", "--method", "fastv",
                                     "--overwrite", capsys=capsys)
    assert code == 0 and summary["answered_now"] == 3, err
    fresh = tmp_path / "fresh.jsonl"
    assert shortv_eval(eval_set, fresh, "--limit", "3", "--method", "fastv", capsys=capsys)[0] == 0
    assert answers.read_bytes() == fresh.read_bytes()


def test_a_file_without_records_is_refused_unless_overwritten(eval_set, tmp_path, capsys):
    """An answer file of an older shortv (or another tool): nothing says what wrote it."""
    answers = tmp_path / "a.jsonl"
    assert shortv_eval(eval_set, answers, "--limit", "2", capsys=capsys)[0] == 0
    old = [{**r, "metadata": {}} for r in lines(answers)]
    answers.write_text("".join(json.dumps(r) + "\n" for r in old))
    before = answers.read_bytes()
    code, _, err = shortv_eval(eval_set, answers, "--limit", "3", capsys=capsys)
    line = one_error_line(code, err)
    assert "no record of the run" in line and "--overwrite" in line
    assert answers.read_bytes() == before
    code, summary, err = shortv_eval(eval_set, answers, "--limit", "3", "--overwrite", capsys=capsys)
    assert code == 0 and summary["answered_now"] == 3 and len(lines(answers)) == 3, err


def test_a_limit_below_the_answers_held_says_there_is_nothing_to_do(eval_set, tmp_path, capsys):
    answers = tmp_path / "a.jsonl"
    assert shortv_eval(eval_set, answers, "--limit", "4", capsys=capsys)[0] == 0
    before = answers.read_bytes()
    code, summary, err = shortv_eval(eval_set, answers, "--limit", "2", capsys=capsys)
    assert code == 0, err
    assert (f"nothing to do: {answers} already holds 4 answers (the first 2 questions asked by "
            "--limit are answered)") in err
    assert summary["n"] == 2 and summary["answered_now"] == 0 and summary["answers_in_file"] == 4
    assert answers.read_bytes() == before


# ---- scripts/eval_methods.py -----------------------------------------------------------------


def test_eval_methods_resumes_when_run_twice(eval_set, tmp_path):
    out = tmp_path / "answers"
    command = [sys.executable, "scripts/eval_methods.py", "llava-tiny-demo", "--questions",
               str(eval_set), "--out", str(out), "--batch-size", "6", "--max-new-tokens", "8",
               "--methods", "fastv"]
    first = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr
    files = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    assert set(files) == {"vanilla.jsonl", "fastv.jsonl"}
    assert {r["metadata"]["shortv"]["method"]["name"] for r in lines(out / "fastv.jsonl")} == {"fastv"}
    second = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr
    assert f"| fastv ({shortv.FastV().describe()}) |" in second.stdout and "Resumed" in second.stdout
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == files


# ---- torchrun ----------------------------------------------------------------------------------


def test_torchrun_refuses_another_run_on_one_line(eval_set, tmp_path, capsys):
    answers = tmp_path / "a.jsonl"
    assert shortv_eval(eval_set, answers, "--limit", "2", "--max-new-tokens", "8", capsys=capsys)[0] == 0
    before = answers.read_bytes()
    run = torchrun("eval", "llava-tiny-demo", "--questions", str(eval_set), "--answers-out", str(answers),
                   "--max-new-tokens", "8", "--quiet", "--method", "fastv", timeout=180)
    assert run.returncode != 0
    [line] = [line for line in run.stderr.splitlines() if line.startswith("shortv eval:")]
    assert line.startswith("shortv eval: error: rank 0: ")
    assert f"written by a run with method=vanilla, this run has method={shortv.FastV().describe()}" in line
    assert root_cause(run.stderr) == ("0", "2")
    assert answers.read_bytes() == before


# ---- the CLI: --version, --help defaults -------------------------------------------------------


def test_version(capsys):
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out == f"shortv {shortv.__version__}\n"


@pytest.mark.parametrize("command, option, default", [
    ("eval", "--max-new-tokens MAX_NEW_TOKENS", "128"),
    ("eval", "--batch-size BATCH_SIZE", "1"),
    ("chat", "--max-new-tokens MAX_NEW_TOKENS", "512"),
    ("lc", "--batch-size BATCH_SIZE", "1"),
    ("bench", "--repeats REPEATS", "5"),
])
def test_help_shows_defaults(capsys, command, option, default):
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    # The option's entry (up to the next option) ends with its default.
    entry = re.search(re.escape(option) + r" ((?:(?! --).)*)", text)
    assert entry and entry.group(1).endswith(f"(default: {default})"), out
