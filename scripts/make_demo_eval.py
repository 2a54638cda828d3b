"""Write the demo's held-out evaluation set as an LLaVA question file with answers.

    python scripts/make_demo_eval.py --out DIR [--n 200] [--seed 99]

Scenes drawn by `make_demo.held_out` with a seed the demo never trained on (the training
scenes come from another generator stream; 99 is the accuracy set of BENCHMARKS.md, 7 the
LC calibration set). DIR gets `questions.jsonl` ({"question_id", "image", "text",
"answer"} per line, images relative to DIR) and `images/NNNN.png` (lossless, so the
answers equal those for the in-memory scenes). Then:

    shortv eval llava-tiny-demo --questions DIR/questions.jsonl --answers-out answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo


def write(out: Path, n: int, seed: int) -> Path:
    """Write n held-out questions (seeded) into `out`; the question file's path."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, question, answer) in enumerate(make_demo.held_out(n, seed=seed)):
        name = f"images/{i:04d}.png"
        image.save(out / name)
        lines.append(json.dumps({"question_id": i, "image": name, "text": question,
                                 "answer": answer}))
    path = out / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=99)
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be >= 1")
    print(write(args.out, args.n, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
