"""Running the CLI as the tests do: its main() in-process, `shortv eval` on a question file,
torchrun with two CPU processes; and what a user error must look like."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import shortv
from shortv import cli

REPO = Path(shortv.__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CPU = ["--device", "cpu", "--dtype", "float32"]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `shortv ARGV`."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str) -> None:
    """A user error: exit status 2 and one line on stderr, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], err


def shortv_eval(eval_set: Path, answers: Path, *extra: str, capsys) -> tuple[int, dict, str]:
    """(exit status, the --json summary, stderr) of `shortv eval` on the demo, in-process."""
    code, out, err = run_main(["eval", "llava-tiny-demo", "--questions", str(eval_set),
                               "--answers-out", str(answers), "--quiet", "--json",
                               "--max-new-tokens", "24", *extra], capsys)
    return code, (json.loads(out) if code == 0 else {}), err


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m shortv ARGS`, in its own process group
    so that a run past `timeout` is ended with all its workers (none left orphaned)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "shortv", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                          cwd=REPO, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def root_cause(stderr: str) -> tuple[str, str]:
    """(rank, exit status) of the "Root Cause" of torchrun's failure report."""
    report = stderr[stderr.index("Root Cause"):]
    rank = re.search(r"rank\s*:\s*(\d+)", report)
    status = re.search(r"exitcode\s*:\s*(-?\d+)", report)
    assert rank and status, stderr
    return rank.group(1), status.group(1)
