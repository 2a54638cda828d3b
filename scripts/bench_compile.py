"""Decode step speed: eager against `LLaVA.compile()`, dynamic shapes and static cache.

    python scripts/bench_compile.py [MODEL] [--batch 1[,4,16]] [--new-tokens 64] [--repeats 5]
        [--method vanilla|shortv|fastv|vtw] [--backend inductor] [--device D] [--dtype D]

Three copies of the model (default: the embedded demo), one eager, one compiled for
dynamic shapes (the CPU default), one compiled on the static KV cache (the CUDA-graph
form, `compile(static=True)`), run interleaved on the same prompt and image: after the
first round (compilation), the median milliseconds per decode step of each and the
ratio to eager, for each batch size of --batch (a comma-separated list: one table row
each, the copies compiled once for all). Every copy must produce the same tokens, or the
script says so and exits 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import shortv
from shortv.errors import ShortVError
from shortv.methods import VANILLA, VTW, FastV, ShortV

IMAGE = Path(shortv.__file__).resolve().parents[1] / "weights" / "llava-tiny-demo" / "example.png"
METHODS = {"vanilla": VANILLA, "shortv": ShortV(), "fastv": FastV(k=2, r=0.5), "vtw": VTW()}


def decode(model: shortv.LLaVA, batch: list, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds per decode step (greedy, after the prefill) and the tokens."""
    logits, state = model.prefill(batch, max_new_tokens=new_tokens)
    token = logits.argmax(-1)
    tokens = [token.tolist()]
    start = time.perf_counter()
    for _ in range(state.budget - 1):
        token = model.step(state, token).argmax(-1)
        tokens.append(token.tolist())
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / max(1, state.budget - 1), tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="llava-tiny-demo")
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", choices=METHODS, default="vanilla")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    args = parser.parse_args()
    try:
        variants = {}
        for name in ("eager", "dynamic", "static"):
            model = shortv.load(args.model, device=args.device, dtype=args.dtype)
            method = METHODS[args.method]
            if args.method == "shortv":  # the later half of the layers frozen
                method = ShortV(tuple(range(model.num_layers // 2, model.num_layers)))
            model.set_method(method)
            if name != "eager":
                model.compile(static=name == "static", backend=args.backend)
            variants[name] = model
        prompt = variants["eager"].encode("Describe the picture in detail.", [IMAGE])
    except ShortVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model}  {args.new_tokens} new tokens  method {args.method}  backend {args.backend}  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}")
    failed = False
    for size in (int(b) for b in args.batch.split(",")):
        batch = [prompt] * size
        runs: dict[str, list[float]] = {name: [] for name in variants}
        answers: dict[str, list[list[int]]] = {}
        for round_ in range(args.repeats + 1):
            for name, model in variants.items():
                seconds, answers[name] = decode(model, batch, args.new_tokens)
                if round_:  # round 0 compiles
                    runs[name].append(seconds)
        eager = statistics.median(runs["eager"])
        same = answers["eager"] == answers["dynamic"] == answers["static"]
        failed |= not same
        print(f"  batch {size:3d}: " + "  ".join(
            f"{name} {statistics.median(r) * 1e3:8.2f} ms/step (x{eager / statistics.median(r):4.2f})"
            for name, r in runs.items()) + ("" if same else "  OTHER TOKENS"), flush=True)
    if failed:
        print("error: the compiled copies gave other tokens than eager", file=sys.stderr)
        return 1
    print("  same tokens: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
