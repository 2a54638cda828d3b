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

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import shortv

from .lmms_tasks import LL_TASK, MC_TASK, task_rows
from .reference import reference_loglikelihood

DEMO = "llava-tiny-demo"
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
