"""loglikelihood through lmms-eval's own CLI (`python -m lmms_eval --model shortv`), and bad
model_args ending the run.

One lmms-eval run (float64, one process) scores two tasks the test writes: a
`multiple_choice` task (one loglikelihood request per choice; lmms-eval's acc is the argmin
of what the model returns) and an `output_type: loglikelihood` task with its own
process_results (lmms-eval 0.7.3's default one unpacks a one-element list and fails for every
model). The logged values and accuracies must be what `model.logits` gives directly. The
same run measures Layer Contribution (`cal_lc`, checked in test_lmms_cal_lc.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import shortv
from tests.test_lmms_eval import REPO, held_out, reference_loglikelihood

DEMO = "llava-tiny-demo"
MC_TASK, LL_TASK = "shortv_test_mc", "shortv_test_ll"
N_DOCS = 5

UTILS = '''\
"""The test tasks' functions (lmms-eval imports this by path)."""
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def loglikelihood_results(doc, results):
    (loss, greedy), = results
    return {"acc": int(greedy), "loss": loss}
'''


def colour_docs() -> list[tuple[Image.Image, dict[str, Any]]]:
    """The first N_DOCS colour questions of held-out scenes (right or wrong for the demo),
    as (image, document) with the six "The SHAPE is COLOUR." choices."""
    sys.path.insert(0, str(REPO / "scripts"))
    import make_demo

    out = []
    for image, question, answer in held_out(80, seed=12):
        if not question.startswith("What colour"):
            continue
        shape = question.removeprefix("What colour is the ").rstrip("?")
        choices = [f"The {shape} is {colour}." for colour in make_demo.COLOURS]
        i = len(out)
        out.append((image, {"id": i, "image": f"images/{i}.png", "question": question,
                            "answer": answer, "choices": choices, "label": choices.index(answer)}))
        if len(out) == N_DOCS:
            return out
    raise AssertionError("too few colour questions")


def task_yaml(name: str, data: Path, body: str) -> str:
    return textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        """) + textwrap.dedent(body)


@pytest.fixture(scope="session")
def mc_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lmms-mc-task")
    (folder / "images").mkdir()
    rows = []
    for image, doc in colour_docs():
        image.save(folder / doc["image"])
        rows.append(doc)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{MC_TASK}.yaml").write_text(task_yaml(MC_TASK, data, """\
        output_type: multiple_choice
        doc_to_choice: !function utils.doc_to_choice
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    (folder / f"{LL_TASK}.yaml").write_text(task_yaml(LL_TASK, data, """\
        output_type: loglikelihood
        doc_to_target: answer
        process_results: !function utils.loglikelihood_results
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: loss
            aggregation: mean
            higher_is_better: false
        """))
    return folder


def task_rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "docs.jsonl").read_text().splitlines()]


def lmms_env(scratch: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(scratch / "hf-home"),
            "HF_DATASETS_CACHE": str(scratch / "hf-datasets")}


@pytest.fixture(scope="session")
def mc_run(mc_task: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The lmms-eval run of both tasks (with cal_lc), and beside it a run with a bad
    model_arg. Per run: exit status, output and (for the good one) the logged samples by
    task and the LC report path."""
    scratch = tmp_path_factory.mktemp("lmms-mc-runs")
    report = scratch / "lc.json"
    common = [sys.executable, "-m", "lmms_eval", "--model", "shortv", "--include_path", str(mc_task),
              "--tasks", f"{MC_TASK},{LL_TASK}", "--batch_size", "4"]
    commands = {
        "good": [*common, "--model_args", f"pretrained={DEMO},device=cpu,dtype=float64,cal_lc={report}",
                 "--log_samples", "--output_path", str(scratch / "out")],
        "bad": [*common, "--model_args", f"pretrained={DEMO},device=cpu,n_frozen=lots"],
    }
    procs = {name: subprocess.Popen(cmd, cwd=scratch, env=lmms_env(scratch), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    out: dict[str, Any] = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr}
    samples = {}
    for task in (MC_TASK, LL_TASK):
        files = sorted((scratch / "out").glob(f"**/*_samples_{task}.jsonl"))
        assert files, f"lmms-eval wrote no samples of {task}:\n{out['good']['stdout'][-6000:]}"
        samples[task] = {s["doc_id"]: s for s in map(json.loads, files[0].read_text().splitlines())}
    out["good"].update(samples=samples, report=report)
    return out


@pytest.fixture(scope="module")
def model64() -> shortv.LLaVA:
    return shortv.load(DEMO, device="cpu", dtype=torch.float64)


def logged_pair(resp: Any) -> tuple[float, bool]:
    """lmms-eval's logged (loss, greedy): it writes the values of the pair as strings."""
    loss, greedy = resp
    assert str(greedy) in ("True", "False"), resp
    return float(loss), str(greedy) == "True"


def test_multiple_choice_scores_and_accuracy_match_the_logits(mc_run, mc_task: Path, model64) -> None:
    run = mc_run["good"]
    assert run["returncode"] == 0, run["stdout"][-6000:]
    assert "Error during evaluation" not in run["stdout"] + run["stderr"]
    rows = task_rows(mc_task)
    logged = run["samples"][MC_TASK]
    assert sorted(logged) == [r["id"] for r in rows]
    correct = []
    for row in rows:
        image = Image.open(mc_task / row["image"]).convert("RGB")
        # lmms-eval puts its target_delimiter " " before each choice.
        reference = [reference_loglikelihood(model64, row["question"], image, f" {c}")
                     for c in row["choices"]]
        pairs = [logged_pair(r) for r in logged[row["id"]]["filtered_resps"]]
        assert len(pairs) == len(row["choices"])
        for (loss, greedy), (logprob, ref_greedy) in zip(pairs, reference, strict=True):
            assert loss == pytest.approx(-logprob, rel=1e-9, abs=1e-9)  # a loss: lower is likelier
            assert greedy == ref_greedy
        likeliest = max(range(len(reference)), key=lambda i: reference[i][0])
        correct.append(likeliest == row["label"])
        assert logged[row["id"]]["acc"] == float(correct[-1]), row
    # Both outcomes occur, so a scorer that picked the least likely choice would fail.
    assert any(correct) and not all(correct), correct


def test_loglikelihood_task_scores_the_target_after_its_delimiter(mc_run, mc_task: Path, model64) -> None:
    run = mc_run["good"]
    assert run["returncode"] == 0, run["stdout"][-6000:]
    logged = run["samples"][LL_TASK]
    for row in task_rows(mc_task):
        image = Image.open(mc_task / row["image"]).convert("RGB")
        logprob, greedy = reference_loglikelihood(model64, row["question"], image, f" {row['answer']}")
        sample = logged[row["id"]]
        assert logged_pair(sample["filtered_resps"]) == (pytest.approx(-logprob, rel=1e-9), greedy)
        assert (sample["loss"], sample["acc"]) == (pytest.approx(-logprob, rel=1e-9), int(greedy))


def test_bad_model_args_end_the_run_with_one_line(mc_run) -> None:
    bad = mc_run["bad"]
    assert bad["returncode"] != 0
    assert "Traceback" not in bad["stderr"]
    assert bad["stderr"].strip().splitlines() == [
        "lmms-eval --model shortv: model_args n_frozen='lots' is not an integer"]
    assert "Building contexts" not in bad["stdout"]  # no task was built
