"""The lmms-eval tasks that test_lmms_loglikelihood.py and test_lmms_cal_lc.py check, and
their one run (its fixtures are in tests/conftest.py): a `multiple_choice` task (one
loglikelihood request per choice) and an `output_type: loglikelihood` task over the same
held-out demo scenes, run by `python -m lmms_eval --model shortv` with `cal_lc`, beside a run
with a bad model_arg."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data import REPO, held_out

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


def task_rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "docs.jsonl").read_text().splitlines()]


def lmms_env(scratch: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(scratch / "hf-home"),
            "HF_DATASETS_CACHE": str(scratch / "hf-datasets")}


def write_mc_tasks(folder: Path) -> Path:
    """Both tasks (their documents, images, utils.py and YAML) written into `folder`."""
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


def run_mc_tasks(mc_task: Path, scratch: Path) -> dict[str, Any]:
    """The lmms-eval run of both tasks (with cal_lc), and beside it a run with a bad
    model_arg. Per run: exit status, output and (for the good one) the logged samples by
    task and the LC report path."""
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


def assert_same_report(got: dict, want: dict) -> None:
    """Two Layer Contribution reports agree: model, samples, scores and ranking."""
    assert (got["model"], got["samples"]) == (want["model"], want["samples"])
    for kind in ("visual", "text"):
        torch.testing.assert_close(torch.tensor(got[kind], dtype=torch.float64),
                                   torch.tensor(want[kind], dtype=torch.float64), rtol=1e-6, atol=1e-13)
    assert got["ranking"] == want["ranking"] and got["ranking_str"] == want["ranking_str"]
