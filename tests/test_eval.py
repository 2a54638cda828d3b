"""`shortv eval`: LLaVA's question and answer files, resuming, scoring, method options,
bad inputs, and data-parallel runs over torchrun (2 CPU processes, gloo) against one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import shortv
from shortv.eval.vqa import vqa_accuracy

from .cli_runner import root_cause, run_main, shortv_eval, torchrun

REPO = Path(shortv.__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_demo_eval  # noqa: E402

N = 12


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 held-out demo questions with answers (a seed the demo never trained on)."""
    return make_demo_eval.write(tmp_path_factory.mktemp("demo-eval"), N, seed=99)


@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    return shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)


def questions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]



# ---- formats, order, answers equal chat ----------------------------------------------------


def test_answer_file_is_llava_format_in_question_order(eval_set, demo, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    code, summary, err = shortv_eval(eval_set, answers, "--batch-size", "5", capsys=capsys)
    assert code == 0, err
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    qs = questions(eval_set)
    assert [r["question_id"] for r in records] == [q["question_id"] for q in qs]
    for r, q in zip(records, qs, strict=True):
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["prompt"] == q["text"] and r["model_id"] == "llava-tiny-demo"
        assert set(r["metadata"]) == {"shortv"}  # the run's record (tests/test_eval_provenance.py)
        # The answer is what chat gives for the question alone (greedy).
        want = demo.chat(q["text"], [eval_set.parent / q["image"]], max_new_tokens=24)
        assert r["text"] == want
    assert len({r["answer_id"] for r in records}) == N
    # Scoring: VQA accuracy of each answer against the question's reference.
    want_acc = sum(vqa_accuracy(r["text"], q["answer"]) for r, q in zip(records, qs, strict=True)) / N
    assert summary["accuracy"] == pytest.approx(want_acc) and summary["n"] == summary["scored"] == N
    assert summary["method"] == "vanilla" and summary["tflops_ratio"] == pytest.approx(1.0)
    assert summary["mean_prompt_tokens"] > 36 and summary["mean_prefill_ms"] > 0
    assert summary["decode_tokens_per_s"] > 0 and summary["wall_s"] > 0


def test_metadata_and_list_answers(tmp_path, eval_set, capsys):
    """Extra fields go to metadata; a list of answers scores min(#matches / 3, 1)."""
    q = questions(eval_set)[0]
    image = str(eval_set.parent / q["image"])
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": "a", "image": image, "text": q["text"],
                                "answer": ["nope", "nope", "nope"], "category": "colour"}) + "\n")
    answers = tmp_path / "a.jsonl"
    code, summary, err = shortv_eval(path, answers, capsys=capsys)
    assert code == 0, err
    [record] = [json.loads(line) for line in answers.read_text().splitlines()]
    assert record["metadata"]["category"] == "colour" and record["question_id"] == "a"
    assert set(record["metadata"]) == {"category", "shortv"}
    assert summary["accuracy"] == 0.0


def test_shortv_options_are_honoured(eval_set, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    code, summary, err = shortv_eval(eval_set, answers, "--n-frozen", "4", "--limit", "4",
                                     "--batch-size", "2", capsys=capsys)
    assert code == 0, err
    model = shortv.load("llava-tiny-demo", n_frozen=4, device="cpu")
    assert summary["method"] == model.method.describe() and summary["tflops_ratio"] < 0.9
    for r, q in zip([json.loads(line) for line in answers.read_text().splitlines()],
                    questions(eval_set), strict=False):
        assert r["text"] == model.chat(q["text"], [eval_set.parent / q["image"]], max_new_tokens=24)
    # The FLOPs ratio is the analytic one for each input.
    enc = model.encode(questions(eval_set)[0]["text"], [eval_set.parent / questions(eval_set)[0]["image"]])
    assert model.flops(enc)["ratio"] == pytest.approx(summary["tflops_ratio"], rel=0.05)


# ---- resuming ---------------------------------------------------------------------------------


def test_resume_appends_only_the_rest(eval_set, tmp_path, capsys):
    full = tmp_path / "full.jsonl"
    assert shortv_eval(eval_set, full, "--batch-size", "4", capsys=capsys)[0] == 0
    part = tmp_path / "part.jsonl"
    code, first, _ = shortv_eval(eval_set, part, "--limit", "5", capsys=capsys)
    assert code == 0 and first["n"] == 5
    head = part.read_bytes()
    code, second, _ = shortv_eval(eval_set, part, "--batch-size", "4", capsys=capsys)
    assert code == 0 and second["answered_now"] == N - 5 and second["n"] == N
    assert part.read_bytes().startswith(head)
    assert part.read_bytes() == full.read_bytes()
    # A finished file: nothing left to do, nothing changes.
    code, third, _ = shortv_eval(eval_set, part, capsys=capsys)
    assert code == 0 and third["answered_now"] == 0 and part.read_bytes() == full.read_bytes()


def test_truncated_last_line_is_repaired(eval_set, tmp_path, capsys):
    full = tmp_path / "full.jsonl"
    assert shortv_eval(eval_set, full, "--batch-size", "6", capsys=capsys)[0] == 0
    data = full.read_bytes()
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 20])  # half of the last line
    code, summary, err = shortv_eval(eval_set, cut, "--batch-size", "6", capsys=capsys)
    assert code == 0, err
    assert summary["answered_now"] == 1 and cut.read_bytes() == data


def test_out_of_order_file_is_rewritten_in_question_order(eval_set, tmp_path, capsys):
    full = tmp_path / "full.jsonl"
    assert shortv_eval(eval_set, full, "--batch-size", "6", capsys=capsys)[0] == 0
    lines = full.read_text().splitlines(keepends=True)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(lines[5:8][::-1]))
    assert shortv_eval(eval_set, shuffled, "--batch-size", "6", capsys=capsys)[0] == 0
    assert shuffled.read_bytes() == full.read_bytes()


# ---- bad inputs: one line, exit 2, answer file untouched -----------------------------------


def bad_question_files(d: Path, eval_set: Path) -> dict[str, tuple[list[str], str]]:
    q = questions(eval_set)[0]
    good = json.dumps({**q, "image": str(eval_set.parent / q["image"])})
    return {
        "missing-image": ([good, json.dumps({**q, "question_id": 9, "image": "nope.png"})], ":2"),
        "bad-json": ([good, "", '{"question_id": 3, "text": '], ":3"),
        "missing-question-id": ([good, json.dumps({"text": "x", "image": q["image"]})], ":2"),
        "duplicate-question-id": ([good, good], ":2"),
        "missing-text": ([json.dumps({"question_id": 1, "image": str(eval_set.parent / q["image"])})], ":1"),
        "empty": ([], "holds no questions"),
    }


@pytest.mark.parametrize("case", ["missing-image", "bad-json", "missing-question-id",
                                  "duplicate-question-id", "missing-text", "empty",
                                  "image-folder-missing", "answers-folder-missing", "foreign-answers"])
def test_bad_inputs_are_one_line_and_leave_the_answer_file_alone(eval_set, tmp_path, capsys, case):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 0, "prompt": "p", "text": "t", "answer_id": "x", '
                       '"model_id": "m", "metadata": {}}\n')
    before = answers.read_bytes()
    path, extra, needle = eval_set, [], ""
    if case in bad_question_files(tmp_path, eval_set):
        lines, needle = bad_question_files(tmp_path, eval_set)[case]
        path = tmp_path / "q.jsonl"
        path.write_text("\n".join(lines) + ("\n" if lines else ""))
    elif case == "image-folder-missing":
        extra, needle = ["--image-folder", str(tmp_path / "nowhere")], "nowhere"
    elif case == "answers-folder-missing":
        answers = tmp_path / "no-such-folder" / "a.jsonl"
        needle = "no-such-folder"
    elif case == "foreign-answers":
        answers.write_text('{"question_id": "zzz", "text": "t"}\n')
        before, needle = answers.read_bytes(), "zzz"
    code, _, err = shortv_eval(path, answers, *extra, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err
    if answers.exists():
        assert answers.read_bytes() == before


# ---- LC on a question file ------------------------------------------------------------------


def test_lc_reads_question_files(eval_set, tmp_path):
    """`shortv lc --data` takes an eval question file: the same samples as the equivalent
    calibration file."""
    from shortv.lc import read_samples

    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"image": str(eval_set.parent / q["image"]), "prompt": q["text"]})
                             + "\n" for q in questions(eval_set)))
    from_questions, from_calib = read_samples(eval_set), read_samples(calib)
    assert [(s.prompt, s.images) for s in from_questions] == [(s.prompt, s.images) for s in from_calib]


# ---- torchrun: 2 processes equal 1 ------------------------------------------------------------


def test_torchrun_eval_equals_one_process_byte_for_byte(eval_set, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    assert shortv_eval(eval_set, one, "--batch-size", "3", capsys=capsys)[0] == 0
    two = tmp_path / "two.jsonl"
    run = torchrun("eval", "llava-tiny-demo", "--questions", str(eval_set), "--answers-out", str(two),
                   "--batch-size", "2", "--max-new-tokens", "24", "--json", "--quiet")
    assert run.returncode == 0, run.stderr
    assert two.read_bytes() == one.read_bytes()
    assert json.loads(run.stdout)["n"] == N  # rank 0 alone prints the summary


def test_torchrun_lc_equals_one_process(eval_set, tmp_path, capsys):
    code, out, err = run_main(["lc", "llava-tiny-demo", "--data", str(eval_set), "--limit", "6",
                               "--json", "--quiet"], capsys)
    assert code == 0, err
    one = json.loads(out)
    run = torchrun("lc", "llava-tiny-demo", "--data", str(eval_set), "--limit", "6", "--json", "--quiet",
                   "--out", str(tmp_path / "lc.json"))
    assert run.returncode == 0, run.stderr
    two = json.loads(run.stdout)
    assert two["ranking"] == one["ranking"] and two["samples"] == 6
    assert two["layer_evaluations"] == one["layer_evaluations"]
    for a, b in zip(one["visual"] + one["text"], two["visual"] + two["text"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(a) + 1e-15
    assert json.loads((tmp_path / "lc.json").read_text())["ranking"] == one["ranking"]


def test_a_failure_on_one_rank_ends_all_ranks(eval_set, tmp_path):
    """The second question's image is broken: only rank 1 meets it, and both ranks stop
    instead of rank 0 waiting for rank 1; the error is printed once, by rank 1, and
    torchrun's report blames rank 1's exit 2."""
    qs = questions(eval_set)[:4]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    qs[1] = {**qs[1], "image": str(broken)}
    for q in qs[:1] + qs[2:]:
        q["image"] = str(eval_set.parent / q["image"])
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    run = torchrun("eval", "llava-tiny-demo", "--questions", str(path), "--answers-out",
                   str(tmp_path / "a.jsonl"), "--max-new-tokens", "8", "--quiet", timeout=180)
    assert run.returncode != 0
    [line] = [line for line in run.stderr.splitlines() if line.startswith("shortv eval:")]
    assert line.startswith("shortv eval: error: rank 1: ")
    assert "broken.png" in line and "q.jsonl:2" in line
    assert root_cause(run.stderr) == ("1", "2")
