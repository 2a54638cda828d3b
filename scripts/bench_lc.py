"""LC benchmark: shortv's algorithm vs the paper's naive L + 1 passes per token type.

    python scripts/bench_lc.py [--layers 32] [--hidden 256] [--samples 4] [--repeats 3] [--json]

Builds a random LLaVA-1.5-shaped checkpoint (original layout, CPU, fp32) with L decoder
layers, computes visual and text LC for the same samples with both algorithms
(interleaved, several repeats, medians), checks they agree, and reports decoder-layer
evaluations and wall-clock for each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_checkpoint
from naive_lc import naive_layer_contribution

import shortv
from shortv import lc

PROMPTS = ["What is in the image?", "Describe the colours.", "Is there a circle on the left?",
           "How many shapes are there?"]


def checkpoint(root: Path, layers: int, hidden: int) -> Path:
    """A random checkpoint of the given depth and width, with the demo's tokenizer."""
    text = {**random_checkpoint.TEXT, "num_hidden_layers": layers, "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4, "num_attention_heads": hidden // 32,
            "num_key_value_heads": hidden // 32}
    demo = Path(shortv.store.local_weights("llava-tiny-demo"))
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    random_checkpoint.write(root, text, random_checkpoint.VISION, vocab)
    random_checkpoint.tokenizer_from(demo, root)
    return root


def samples(n: int) -> list[lc.Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        pixels = (torch.rand(64 + 8 * i, 96, 3, generator=g) * 255).to(torch.uint8)
        image = Image.frombytes("RGB", (96, 64 + 8 * i), pixels.numpy().tobytes())
        out.append(lc.Sample(PROMPTS[i % len(PROMPTS)], (image,), f"sample {i}"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = shortv.load(checkpoint(Path(tmp), args.layers, args.hidden), device="cpu")
    encoded = [lc.encode_sample(model, s) for s in samples(args.samples)]
    times: dict[str, list[float]] = {"shortv": [], "naive": []}
    reports = {}
    runs = {"shortv": lambda: lc.layer_contribution(model, encoded, progress=False),
            "naive": lambda: naive_layer_contribution(model, encoded)}
    for i in range(args.repeats):
        for name in (("shortv", "naive") if i % 2 == 0 else ("naive", "shortv")):
            start = time.perf_counter()
            reports[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
    fast, naive = reports["shortv"], reports["naive"]
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(
        fast.visual + fast.text, naive.visual + naive.text, strict=True) if abs(b) > 1e-9)
    result = {
        "layers": args.layers, "hidden": args.hidden, "samples": args.samples,
        "tokens_per_sample": [int(e.input_ids.numel()) for e in encoded],
        "repeats": args.repeats,
        "shortv_layer_evaluations": fast.layer_evaluations,
        "naive_layer_evaluations": naive.layer_evaluations,
        "evaluation_ratio": naive.layer_evaluations / fast.layer_evaluations,
        "shortv_s": statistics.median(times["shortv"]),
        "naive_s": statistics.median(times["naive"]),
        "speedup": statistics.median(times["naive"]) / statistics.median(times["shortv"]),
        "max_relative_difference": diff,
        "same_ranking": fast.ranking == naive.ranking,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"L={args.layers}, hidden {args.hidden}, {args.samples} samples: "
              f"layer evaluations {result['naive_layer_evaluations']} (naive) vs "
              f"{result['shortv_layer_evaluations']} ({result['evaluation_ratio']:.2f}x fewer); "
              f"wall-clock {result['naive_s']:.2f} s vs {result['shortv_s']:.2f} s "
              f"({result['speedup']:.2f}x); max relative difference {diff:.1e}; "
              f"same ranking: {result['same_ranking']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
