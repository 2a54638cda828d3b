"""What the layers' hook points cost (docs/internals.md): a forward through
`run_with_hooks` with no hook, `run_with_cache` of every layer's residual stream, and of
every hook point, against `logits`, interleaved in one process, medians of the rounds.

    python scripts/bench_hooks.py [MODEL] [--repeats 5] [--prompt-words 40] [--json]

MODEL: a zoo name or checkpoint folder (default: llava-tiny-demo). For a larger one, e.g.
`scripts/random_serve_checkpoint.py /tmp/w --hidden 2048 --layers 8` (576 visual tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image

import shortv

NAMES = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]


def interleaved_ms(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Each case's time in ms, `repeats` rounds, the cases interleaved within a round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="llava-tiny-demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-words", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = shortv.load(args.model, device="cpu", dtype=torch.float32)
    image = Image.fromarray(torch.randint(0, 255, (336, 336, 3), dtype=torch.uint8).numpy())
    enc = model.encode(" ".join(["describe the picture"] * (args.prompt_words // 3)), image)
    cases = {
        "logits": lambda: model.logits(enc),
        "run_with_hooks, no hook": lambda: model.run_with_hooks(enc, {}),
        "run_with_cache, resid_post of every layer": lambda: model.run_with_cache(enc, names=["resid_post"]),
        "run_with_cache, 5 residual points of every layer": lambda: model.run_with_cache(enc, names=NAMES),
        "run_with_cache, attn_pattern of one layer": lambda: model.run_with_cache(
            enc, names=["attn_pattern"], layers=[model.num_layers // 2]),
    }
    for fn in cases.values():  # warm-up round
        fn()
    times = interleaved_ms(cases, args.repeats)
    base = statistics.median(times["logits"])
    rows = [{"case": name, "ms": statistics.median(runs), "runs_ms": runs,
             "ratio": statistics.median(runs) / base} for name, runs in times.items()]
    if args.json:
        print(json.dumps({"model": args.model, "tokens": int(model.token_types(enc).numel()),
                          "layers": model.num_layers, "rows": rows}, indent=1))
        return
    print(f"{args.model}: {int(model.token_types(enc).numel())} tokens, {model.num_layers} layers")
    print("| case | ms (median) | runs ms | vs logits |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['case']} | {row['ms']:.1f} | {', '.join(f'{r:.1f}' for r in row['runs_ms'])} | "
              f"{row['ratio']:.3f} |")


if __name__ == "__main__":
    main()
