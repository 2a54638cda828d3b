"""`shortv bench`: decoder prefill latency, vanilla vs a method, in one process."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..errors import ConfigError
from ..models.quant import Quantization
from ..ranking import with_family_defaults
from .options import (
    add_method,
    add_runtime,
    int_at_least,
    method_for,
    model_config,
    print_json,
    quantize_options,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="decoder prefill latency, vanilla vs a method")
    p.add_argument("model", help="zoo name or checkpoint directory")
    p.add_argument("--random-weights", action="store_true",
                   help="build the model's shapes with random weights (no checkpoint needed)")
    p.add_argument("--layers", type=int_at_least(1),
                   help="with --random-weights: keep only the first L decoder layers")
    p.add_argument("--share-layers", action="store_true",
                   help="with --random-weights: all layers reuse one layer's weights (full "
                        "depth and compute in one layer's memory)")
    p.add_argument("--n-text", type=int_at_least(1), default=64)
    p.add_argument("--n-visual", type=int_at_least(0),
                   help="default: 576 (LLaVA-1.5) / 2880 (LLaVA-NeXT)")
    p.add_argument("--repeats", type=int_at_least(1), default=5)
    p.add_argument("--warmup", type=int_at_least(0), default=1)
    p.add_argument("--json", action="store_true")
    add_runtime(p)
    add_method(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import bench, load
    from ..flops import default_n_visual
    from ..loading import resolve_device, resolve_dtype

    # Everything that can be checked without building the model is checked first.
    if not args.random_weights and (args.layers is not None or args.share_layers):
        raise ConfigError("--layers and --share-layers need --random-weights")
    device = resolve_device(args.device)
    quantization = Quantization.of(**quantize_options(args))
    dtype = resolve_dtype(args.dtype, device, quantized=quantization is not None)
    config, card = model_config(args.model)
    text = config.text if args.layers is None else _slice(config.text, args.layers)
    card = _card_for_slice(card, text.layers, args) if args.layers is not None else card
    method = with_family_defaults(config, method_for(args, text.layers, card,
                                                     model_name=card.name if card else args.model))
    if method.name == "vanilla":
        raise ConfigError("bench compares vanilla with a method: give --n-frozen, "
                          "--frozen-layers or --method NAME")
    n_visual = default_n_visual(config) if args.n_visual is None else args.n_visual
    types = bench.layout(args.n_text, n_visual, device)

    say = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.random_weights:
        say(f"building {text.layers} random decoder layers ({device}, {dtype}) ...")
        # Quantized layer by layer (a ConfigError on a device other than the CPU).
        decoder = bench.random_decoder(text, device, dtype, share_layers=args.share_layers,
                                       quantization=quantization)
    else:
        say(f"loading {args.model} ...")
        decoder = load(args.model, device=device, dtype=dtype, **quantize_options(args)).module.decoder
    say(f"timing vanilla and {method.describe()}: {args.warmup} warm-up + {args.repeats} rounds ...")
    result = bench.bench_prefill(decoder, method, types, repeats=args.repeats, warmup=args.warmup)
    report = {
        "model": args.model, "method": method.describe(), "layers": text.layers,
        "n_text": args.n_text, "n_visual": n_visual, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats,
        "quantize": None if quantization is None else quantization.describe(),
        "random_weights": bool(args.random_weights), "share_layers": bool(args.share_layers),
        "vanilla_ms": round(result.vanilla_ms, 3), "method_ms": round(result.method_ms, 3),
        "speedup": round(result.speedup, 4), "flops_speedup": round(result.flops_speedup, 4),
        "speedup_vs_flops": round(result.speedup / result.flops_speedup, 4),
        "vanilla_tflops": result.vanilla_tflops, "method_tflops": result.method_tflops,
    }
    report[f"{method.name}_ms"] = report["method_ms"]
    if args.json:
        print_json(report)
    else:
        print(f"{args.model} ({text.layers} layers, {device}, {report['dtype']}), "
              f"{args.n_text} text + {n_visual} visual tokens, {method.describe()}:")
        print(f"  vanilla {result.vanilla_ms:.2f} ms, {method.name} {result.method_ms:.2f} ms "
              f"(medians of {args.repeats}); speedup {result.speedup:.2f}x, "
              f"FLOPs ratio {result.flops_speedup:.2f}x")
    return 0


def _slice(text, layers: int):
    if layers > text.layers:
        raise ConfigError(f"--layers must be between 1 and the model's {text.layers} layers")
    return replace(text, layers=layers)


def _card_for_slice(card, n_layers: int, args: argparse.Namespace):
    """The card with its ranking restricted to the layers a --layers slice keeps."""
    if card is None:
        return None
    kept = tuple(i for i in card.ranking if i < n_layers)
    if args.n_frozen is not None and args.ranking is None and args.n_frozen > len(kept):
        raise ConfigError(
            f"--layers {n_layers} keeps only layers {list(kept)} of the card's ranking, so "
            f"--n-frozen can be at most {len(kept)}; name the layers instead "
            f"(e.g. --frozen-layers {','.join(map(str, range(n_layers)))})")
    return replace(card, ranking=kept, n_frozen=min(card.n_frozen or 0, len(kept)) or None)
