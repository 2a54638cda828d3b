"""lmms-eval's `cal_lc` against `shortv lc`: the Layer Contribution that the lmms-eval run of
test_lmms_loglikelihood.py measured on its requests' prompts must be the report that
`shortv lc --data` writes for a calibration file of the same images and prompts (each
document's prompt once per task, however many choices it sent)."""

from __future__ import annotations

import json
from pathlib import Path

from shortv.cli import main

from .lmms_tasks import assert_same_report, task_rows

DEMO = "llava-tiny-demo"


def test_cal_lc_report_is_the_report_of_shortv_lc(mc_run, mc_task: Path, tmp_path: Path) -> None:
    run = mc_run["good"]
    assert run["returncode"] == 0, run["stdout"][-6000:]
    got = json.loads(run["report"].read_text())
    # Two tasks over the same documents: each document's prompt counts once per task.
    rows = task_rows(mc_task)
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text("".join(
        json.dumps({"image": str(mc_task / r["image"]), "prompt": r["question"]}) + "\n"
        for r in rows + rows))
    assert main(["lc", DEMO, "--data", str(calibration), "--dtype", "float64", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "lc.json")]) == 0
    want = json.loads((tmp_path / "lc.json").read_text())
    assert want["samples"] == 2 * len(rows)
    assert_same_report(got, want)
    assert max(got["text"]) > 1e-3 and max(got["visual"]) > 1e-9  # not all zeros
