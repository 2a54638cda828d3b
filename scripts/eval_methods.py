"""The paper's table in miniature: every method on one question file with `shortv eval`'s
engine — accuracy, analytic prefill FLOPs ratio and measured prefill speedup side by side.

    python scripts/make_demo_eval.py --out /tmp/demo-eval
    python scripts/eval_methods.py llava-tiny-demo --questions /tmp/demo-eval/questions.jsonl \
        --out /tmp/demo-eval-answers [--batch-size 16] [--dtype bfloat16] [--quantize int8] [--json]

The model is loaded once; each method writes its own answer file (`<out>/<label>.jsonl`).
A rerun resumes them (each only if written with the same method and options, see `shortv
eval`): the accuracy covers every answer, the measured columns only the questions answered
in this run ("-" for none); --overwrite starts every file afresh, to measure all of them.
Methods: vanilla, then by default
ShortV with the card's N, FastV k=2 r=0.5, VTW k = half the layers; or `--methods` entries
as scripts/bench_methods.py takes them ("visionzip budget=18; pdrop layers=2,4,6").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import shortv
from shortv.errors import ShortVError
from shortv.eval.runner import evaluate
from shortv.generate import GenerationOptions
from shortv.methods import Vanilla
from shortv.questions import read_questions
from shortv.ranking import entry_method


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--questions", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--methods", help='";"-separated method entries (see above)')
    parser.add_argument("--overwrite", action="store_true",
                        help="start every answer file afresh (re-measure) instead of resuming")
    parser.add_argument("--dtype", help="default: float32, bfloat16 with --quantize")
    parser.add_argument("--quantize", choices=("int8", "int4", "w8a8"))
    parser.add_argument("--group-size", type=int)
    args = parser.parse_args()
    try:
        questions = read_questions(args.questions)
        model = shortv.load(args.model, device="cpu", dtype=args.dtype, quantize=args.quantize,
                            group_size=args.group_size)
        card = shortv.zoo.get_card(args.model)
        entries = [e.strip() for e in (args.methods or "shortv; fastv; vtw").split(";") if e.strip()]
        layers = model.num_layers
        methods = {"vanilla": Vanilla(),
                   **{e: entry_method(e, card, layers) for e in entries}}
        args.out.mkdir(parents=True, exist_ok=True)
        # Warm-up (first calls allocate and pick kernels), so the first method is not charged for it.
        warm = questions[: args.batch_size]
        model.generate([q.text for q in warm], [list(q.images) for q in warm], max_new_tokens=2)
        rows = []
        for label, method in methods.items():
            model.set_method(method)
            answers = args.out / (re.sub(r"[^A-Za-z0-9=.,+-]+", "_", label) + ".jsonl")
            summary = evaluate(model, questions, answers,
                               options=GenerationOptions(max_new_tokens=args.max_new_tokens),
                               batch_size=args.batch_size, progress=not args.json,
                               overwrite=args.overwrite)
            rows.append({"label": label, **summary})
    except ShortVError as e:
        print(f"eval_methods: error: {e}", file=sys.stderr)
        return 2
    add_speedups(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table(rows))
    return 0


def add_speedups(rows: list[dict]) -> None:
    """Each row's measured prefill speedup over the first (vanilla), where both measured
    every question in this run (a resumed file measured only some, or none: None)."""
    base = rows[0]
    for row in rows:
        comparable = base["answered_now"] == base["n"] and row["answered_now"] == row["n"]
        row["prefill_speedup"] = (base["mean_prefill_ms"] / row["mean_prefill_ms"]
                                  if comparable and row["mean_prefill_ms"] else None)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table, and a note for the methods whose files were resumed."""
    lines = ["| method | accuracy | TFLOPs ratio | prefill ms / batch | measured prefill speedup |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} ({r['method']}) | {cell(r['accuracy'], '.1%')} | "
                     f"{cell(r['tflops_ratio'], '.0%')} | {cell(r['mean_prefill_ms'], '.1f')} | "
                     f"{cell(r['prefill_speedup'], '.2f')}{'x' if r['prefill_speedup'] else ''} |")
    resumed = [f"{r['label']} {r['answered_now']} of {r['n']}" for r in rows if r["answered_now"] < r["n"]]
    if resumed:
        lines.append(f"\nResumed answer files; measured in this run: {', '.join(resumed)} questions "
                     "(--overwrite measures all).")
    return "\n".join(lines)


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())
