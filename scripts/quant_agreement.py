"""How closely a quantized model follows the dense one: per-token top-1 agreement of the
next-token logits with a bfloat16 model, on a fixed prompt set.

    python scripts/quant_agreement.py llava-tiny-demo --questions /tmp/demo-eval/questions.jsonl \
        [--limit 100] [--new-tokens 16] [--schemes int8,int4,int4:32] [--json]

For each question the bfloat16 model answers greedily (`--new-tokens`); then each model
scores the prompt plus that answer in one forward pass, and at every answer position
(teacher-forced, so that one early difference does not change all later ones) the two
models' most likely next tokens are compared. Also reported: the mean KL divergence of the
quantized model's next-token distribution from the dense one's at those positions.
Schemes are "int8", "int4" (group 128) or "int4:G".
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import shortv
from shortv.models.batch import Encoded
from shortv.questions import read_questions


def scheme_of(text: str) -> tuple[str, int | None]:
    name, _, group = text.partition(":")
    return name, int(group) if group else None


@torch.inference_mode()
def answer_logits(model: shortv.VisionLanguageModel, enc: Encoded, answer: list[int]) -> torch.Tensor:
    """Next-token logits [len(answer), vocab] at the answer's positions (teacher-forced)."""
    ids = torch.cat((enc.input_ids, torch.tensor(answer, dtype=torch.long)))
    logits = model.logits(Encoded(ids, enc.images, enc.image_sizes))
    return logits[-len(answer) - 1: -1].float()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--questions", required=True)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--schemes", default="int8,int4,int4:32")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    questions = read_questions(args.questions, limit=args.limit)
    dense = shortv.load(args.model, device="cpu", dtype="bfloat16")
    encoded, answers = [], []
    for q in questions:
        enc = dense.encode(q.text, list(q.images))
        result = dense.generate([q.text], [list(q.images)], max_new_tokens=args.new_tokens)[0]
        if result.token_ids:
            encoded.append(enc)
            answers.append(result.token_ids)
    reference = [answer_logits(dense, e, a) for e, a in zip(encoded, answers, strict=True)]
    rows = []
    for text in args.schemes.split(","):
        scheme, group = scheme_of(text)
        model = shortv.load(args.model, device="cpu", quantize=scheme, group_size=group)
        same = total = 0
        kl = 0.0
        for enc, answer, ref in zip(encoded, answers, reference, strict=True):
            got = answer_logits(model, enc, answer)
            same += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(answer)
            kl += float(torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                   reduction="sum"))
        rows.append({"scheme": model.quantization.describe(), "positions": total,
                     "top1_agreement": round(same / total, 4), "mean_kl": round(kl / total, 5)})
        print(f"{rows[-1]}", file=sys.stderr, flush=True)
    report = {"model": args.model, "questions": len(encoded), "reference": "bfloat16 (dense)",
              "command": "python " + " ".join(sys.argv), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['command']}: {len(encoded)} prompts, top-1 agreement with {report['reference']}")
    print("| scheme | positions | top-1 agreement | mean KL (nats) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['scheme']} | {r['positions']} | {100 * r['top1_agreement']:.1f} % | {r['mean_kl']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
