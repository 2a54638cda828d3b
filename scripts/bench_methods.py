"""The paper's comparison on one model: vanilla, FastV, VTW and ShortV prefill (or any
methods, e.g. the field's at its standard budgets).

    python scripts/bench_methods.py llava-v1.5-7b [--share-layers] [--layers L] [--dtype D]
        [--device D] [--n-text 64] [--n-visual V] [--repeats 3] [--json]
        [--methods "fastv; vtw; shortv; visionzip budget=64; pdrop layers=2,8,16 budget=64"]

Random weights in the zoo model's shapes (see `shortv bench --random-weights`); the
methods run interleaved in one process (several rounds, medians), after vanilla. Default
methods as in the paper's table: FastV k=2 r=0.5, VTW k = half the layers, ShortV with the
card's N and ranking. `--methods`: ";"-separated entries, each a method name as
`--method` takes it (shortv+fastv composes) followed by NAME=VALUE parameters (budget=N,
k=, r=, or any field, as `--param`). A method that reduces images before the language
model (VisionZip) is timed on the decoder with its reduced visual count; its FLOPs ratio
is against vanilla on the full image. Reports TFLOPs, the FLOPs ratio to vanilla,
measured ms and speedup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace

from shortv import bench, zoo
from shortv.errors import ShortVError
from shortv.flops import default_n_visual, sequence_flops
from shortv.loading import resolve_device, resolve_dtype
from shortv.methods import VANILLA
from shortv.ranking import entry_method


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--share-layers", action="store_true")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--device")
    parser.add_argument("--n-text", type=int, default=64)
    parser.add_argument("--n-visual", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--methods", help='";"-separated method entries (see above)')
    args = parser.parse_args()
    try:
        card = zoo.get_card(args.model)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        text = card.config.text if args.layers is None else replace(card.config.text, layers=args.layers)
        n_visual = default_n_visual(card.config) if args.n_visual is None else args.n_visual
        entries = args.methods.split(";") if args.methods else ["fastv", "vtw", "shortv"]
        methods = [VANILLA] + [entry_method(e, card, text.layers)
                               for e in entries if e.strip()]
        decoder = bench.random_decoder(text, device, dtype, share_layers=args.share_layers)
        full = bench.layout(args.n_text, n_visual, device)
        layouts = [bench.layout(args.n_text, m.image_tokens(n_visual), device) for m in methods]
        runs = bench.time_methods(decoder, methods, layouts, repeats=args.repeats, warmup=args.warmup)
    except ShortVError as e:
        print(f"bench_methods: error: {e}", file=sys.stderr)
        return 2
    vanilla_flops = sequence_flops(text, VANILLA, full[0])
    vanilla_ms = statistics.median(runs[0])
    rows = []
    for method, types, times in zip(methods, layouts, runs, strict=True):
        flops = sequence_flops(text, method, types[0])
        ms = statistics.median(times)
        rows.append({"method": method.describe(), "tflops": flops / 1e12,
                     "flops_ratio": flops / vanilla_flops, "ms": ms,
                     "speedup": vanilla_ms / ms, "runs_ms": times})
    result = {"model": card.name, "layers": text.layers, "n_text": args.n_text,
              "n_visual": n_visual, "device": str(device), "dtype": str(dtype),
              "share_layers": args.share_layers, "repeats": args.repeats, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{card.name}: {text.layers} layers, {args.n_text} text + {n_visual} visual tokens, "
          f"{device}, {str(dtype).removeprefix('torch.')}, medians of {args.repeats}")
    print(f"{'method':<58} {'TFLOPs':>7} {'ratio':>6} {'ms':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['method'][:58]:<58} {r['tflops']:>7.2f} {r['flops_ratio']:>6.0%} "
              f"{r['ms']:>9.1f} {r['speedup']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
