"""A random LLaVA-1.5-shaped checkpoint for serving benchmarks where pruning can show.

    python scripts/random_serve_checkpoint.py OUT [--hidden 512] [--layers 8]
        [--vision-hidden 64] [--vision-layers 3] [--image-size 336] [--patch 14] [--seed 0]

The demo (weights/llava-tiny-demo) has 36 visual tokens of an 80-token prompt and tiny
layers, so a served request's time is per-call overhead (HTTP, PNG decoding, the tower,
a few decode steps) and methods that remove visual-token work cannot show. This writes
random weights (original LLaVA layout, `scripts/random_checkpoint.py`) in which the
visual tokens dominate the prompt (336 px / patch 14: 576 of them, as LLaVA-1.5) and the
decoder dominates the cost (a wide decoder, a narrow tower), small enough for a 2-core
CPU, with the demo's tokenizer copied in. Answers are random text: benchmark with a
short max_tokens, EOS may never come.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "weights" / "llava-tiny-demo"


def text_config(hidden: int, layers: int) -> dict:
    """LLaMA decoder shapes in LLaVA-1.5's proportions (MLP 11/4 wide, head dim 64)."""
    if hidden % 64:
        raise SystemExit(f"--hidden {hidden}: must be a multiple of 64 (head dim 64)")
    heads = hidden // 64
    return {**random_checkpoint.TEXT, "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads}


def vision_config(hidden: int, layers: int, image_size: int, patch: int) -> dict:
    """A narrow CLIP tower at LLaVA-1.5's resolution ((image_size / patch)^2 visual tokens)."""
    if image_size % patch:
        raise SystemExit(f"--image-size {image_size} is not a multiple of --patch {patch}")
    if layers < 2:
        raise SystemExit("--vision-layers must be >= 2 (LLaVA reads the penultimate layer)")
    return {**random_checkpoint.VISION, "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
            "image_size": image_size, "patch_size": patch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vocab = json.loads((DEMO / "config.json").read_text())["vocab_size"]
    text = text_config(args.hidden, args.layers)
    vision = vision_config(args.vision_hidden, args.vision_layers, args.image_size, args.patch)
    random_checkpoint.write(args.out, text, vision, vocab, seed=args.seed)
    random_checkpoint.tokenizer_from(DEMO, args.out)
    print(f"{args.out}: decoder {args.layers} x {args.hidden}, tower {args.vision_layers} x "
          f"{args.vision_hidden} at {args.image_size} px / patch {args.patch} "
          f"({(args.image_size // args.patch) ** 2} visual tokens), vocab {vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
