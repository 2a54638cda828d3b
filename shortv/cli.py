"""The `shortv` command line: chat, zoo, flops, bench, lc.

Every command that reports numbers takes --json and then prints one JSON object on
stdout. Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import ConfigError, ShortVError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (and exits 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- option types -------------------------------------------------------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


def _float_in(low: float, high: float, *, open_low: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < value if open_low else low <= value) or value > high:
            raise argparse.ArgumentTypeError(
                f"{value} must be in {'(' if open_low else '['}{low}, {high}]")
        return value

    return parse


def _layer_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of layer ids") from None


# ---- shared options -----------------------------------------------------------------------


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                   help="default: bfloat16 on CUDA, float32 on CPU")


def _add_method(p: argparse.ArgumentParser, *, ranking: bool = True) -> None:
    g = p.add_argument_group("method (vanilla, ShortV, FastV, VTW)")
    g.add_argument("--method", choices=("vanilla", "shortv", "fastv", "vtw"),
                   help="default: shortv if --n-frozen/--frozen-layers is given, else vanilla")
    g.add_argument("--n-frozen", type=_int_at_least(0), metavar="N",
                   help="ShortV: freeze the first N layers of the ranking")
    g.add_argument("--frozen-layers", type=_layer_list, metavar="I,J,...",
                   help="ShortV: freeze exactly these layer ids")
    if ranking:
        g.add_argument("--ranking", metavar="REPORT",
                       help="ranking for --n-frozen: an LC report from `shortv lc` "
                            "(default: the zoo card's)")
    g.add_argument("--k", type=_int_at_least(0), help="FastV/VTW layer K (FastV default 2, "
                                                       "VTW default half the layers)")
    g.add_argument("--r", type=_float_in(0.0, 1.0), help="FastV fraction of visual tokens "
                                                         "dropped (default 0.5)")


def _method(args: argparse.Namespace, num_layers: int, card: Any = None):
    from .frozen import build_method

    return build_method(
        args.method, num_layers, n_frozen=args.n_frozen, frozen_layers=args.frozen_layers,
        ranking=getattr(args, "ranking", None),
        default_ranking=card.ranking if card is not None else (),
        default_n_frozen=card.n_frozen if card is not None else None, k=args.k, r=args.r,
    )


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ---- commands -----------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    from . import load, zoo
    from .llava import to_pil

    images = [to_pil(path) for path in args.image]  # fail on bad files before loading
    model = load(args.model, device=args.device, dtype=args.dtype)
    model.set_method(_method(args, model.num_layers, zoo.card(args.model)))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        _answer(model, args.prompt, images, [], options, args.no_stream)
        return 0
    print(f"[{model.name}, {model.method.describe()}] type a message; 'exit' or Ctrl-D ends.",
          file=sys.stderr)
    history: list[tuple[str, str]] = []
    while True:
        try:
            prompt = input("USER: ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if prompt.strip().lower() in ("exit", "quit"):
            return 0
        if not prompt.strip():
            continue
        print("ASSISTANT: ", end="", flush=True)
        reply = _answer(model, prompt, images, history, options, args.no_stream)
        history.append((prompt, reply))


def _answer(model, prompt: str, images, history, options: dict, no_stream: bool) -> str:
    if no_stream:
        reply = model.chat(prompt, images, history=history, **options)
        print(reply)
        return reply
    pieces = []
    for piece in model.chat(prompt, images, history=history, stream=True, **options):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)


def cmd_zoo(args: argparse.Namespace) -> int:
    from . import zoo

    cards = zoo.cards()
    if args.json:
        _print_json({"models": [c.summary() for c in cards]})
        return 0
    rows = [("name", "layers", "images", "paper N", "weights", "source")]
    for c in cards:
        s = c.summary()
        rows.append((c.name, str(s["layers"]), s["image_aspect_ratio"],
                     str(s["n_frozen"] or "-"), "local" if s["local_weights"] else "hub",
                     c.repo or "embedded"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _model_config(source: str):
    """A zoo card's config, or a local checkpoint's (read without loading weights)."""
    from . import zoo

    card = zoo.card(source)
    if card is not None:
        return card.config, card
    from .loading import config_of_directory

    return config_of_directory(zoo.locate(source)), None


def cmd_flops(args: argparse.Namespace) -> int:
    from .flops import default_n_visual, flops_report

    config, card = _model_config(args.model)
    method = _method(args, config.text.layers, card)
    n_visual = default_n_visual(config) if args.n_visual is None else args.n_visual
    report = flops_report(config.text, method, args.n_text, n_visual)
    report["model"] = args.model
    if args.json:
        _print_json(report)
    else:
        print(f"{args.model}, {method.describe()}, {args.n_text} text + {n_visual} visual tokens: "
              f"{report['tflops']:.1f} TFLOPs ({report['ratio']:.0%} of vanilla "
              f"{report['vanilla_tflops']:.1f})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench, load
    from .flops import default_n_visual
    from .loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.random_weights:
        config, card = _model_config(args.model)
        text = config.text
        if args.layers is not None:
            text = _slice(text, args.layers)
        decoder = bench.random_decoder(text, device, dtype, share_layers=args.share_layers)
    else:
        if args.layers is not None or args.share_layers:
            raise ConfigError("--layers and --share-layers need --random-weights")
        from . import zoo

        model = load(args.model, device=device, dtype=dtype)
        card, decoder = zoo.card(args.model), model.decoder
        config = model.config
    n_layers = len(decoder.layers)
    if card is not None and args.layers is not None:  # rank only the layers that exist
        from dataclasses import replace

        kept = tuple(i for i in card.ranking if i < n_layers)
        card = replace(card, ranking=kept, n_frozen=min(card.n_frozen or 0, len(kept)) or None)
        if args.n_frozen is not None and args.ranking is None and args.n_frozen > len(kept):
            raise ConfigError(
                f"--layers {n_layers} keeps only layers {list(kept)} of the card's ranking, so "
                f"--n-frozen can be at most {len(kept)}; name the layers instead "
                f"(e.g. --frozen-layers {','.join(map(str, range(n_layers)))})")
    method = _method(args, n_layers, card)
    if method.name == "vanilla":
        raise ConfigError("bench compares vanilla with a method: give --n-frozen, "
                          "--frozen-layers or --method shortv|fastv|vtw")
    n_visual = default_n_visual(config) if args.n_visual is None else args.n_visual
    types = bench.layout(args.n_text, n_visual, device)
    result = bench.bench_prefill(decoder, method, types, repeats=args.repeats, warmup=args.warmup)
    report = {
        "model": args.model, "method": method.describe(), "layers": n_layers,
        "n_text": args.n_text, "n_visual": n_visual, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats,
        "random_weights": bool(args.random_weights), "share_layers": bool(args.share_layers),
        "vanilla_ms": round(result.vanilla_ms, 3), "method_ms": round(result.method_ms, 3),
        "speedup": round(result.speedup, 4), "flops_speedup": round(result.flops_speedup, 4),
        "speedup_vs_flops": round(result.speedup / result.flops_speedup, 4),
        "vanilla_tflops": result.vanilla_tflops, "method_tflops": result.method_tflops,
    }
    report[f"{method.name}_ms"] = report["method_ms"]
    if args.json:
        _print_json(report)
    else:
        print(f"{args.model} ({n_layers} layers, {device}, {report['dtype']}), "
              f"{args.n_text} text + {n_visual} visual tokens, {method.describe()}:")
        print(f"  vanilla {result.vanilla_ms:.2f} ms, {method.name} {result.method_ms:.2f} ms "
              f"(medians of {args.repeats}); speedup {result.speedup:.2f}x, "
              f"FLOPs ratio {result.flops_speedup:.2f}x")
    return 0


def _slice(text, layers: int):
    from dataclasses import replace

    if layers < 1 or layers > text.layers:
        raise ConfigError(f"--layers must be between 1 and the model's {text.layers} layers")
    return replace(text, layers=layers)


def cmd_lc(args: argparse.Namespace) -> int:
    from . import lc, load

    samples = lc.read_samples(args.data, limit=args.limit)  # fail on bad data before loading
    if args.plot:
        lc.require_matplotlib()
    model = load(args.model, device=args.device, dtype=args.dtype)
    report = lc.layer_contribution(model, samples, batch_size=args.batch_size,
                                   progress=not args.json and not args.quiet, data=str(args.data))
    if args.out:
        report.save(args.out)
    if args.plot:
        lc.plot(report, args.plot)
    if args.json:
        _print_json(report.to_dict())
        return 0
    print(f"Layer Contribution of {model.name} over {report.samples} samples (KL(Q||P)):")
    print("layer  visual        text")
    for i in range(model.num_layers):
        print(f"{i:5d}  {report.visual[i]:.6e}  {report.text[i]:.6e}")
    print(f"ranking (ascending visual LC): {','.join(map(str, report.ranking))}")
    if args.out:
        print(f"report written to {args.out}; freeze with: shortv chat --model {args.model} "
              f"--ranking {args.out} --n-frozen N")
    return 0


# ---- parser -------------------------------------------------------------------------------


def build_parser() -> Parser:
    parser = Parser(prog="shortv", description="LLaVA with ShortV: chat, zoo, flops, bench, lc.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("chat", help="chat with a model (one-shot with --prompt)")
    p.add_argument("--model", required=True, help="zoo name, checkpoint directory or Hub repo id")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image (repeat for several)")
    p.add_argument("--prompt", help="answer this and exit (otherwise: an interactive loop)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=512)
    p.add_argument("--temperature", type=_float_in(0.0, 100.0), default=0.0)
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, open_low=True))
    p.add_argument("--seed", type=int)
    p.add_argument("--no-stream", action="store_true", help="print the answer when complete")
    _add_runtime(p)
    _add_method(p)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("zoo", help="list the zoo's models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_zoo)

    p = sub.add_parser("flops", help="analytic decoder prefill FLOPs of a method")
    p.add_argument("model", help="zoo name or checkpoint directory")
    p.add_argument("--n-text", type=_int_at_least(1), default=64)
    p.add_argument("--n-visual", type=_int_at_least(0),
                   help="default: 576 (LLaVA-1.5) / 2880 (LLaVA-NeXT)")
    p.add_argument("--json", action="store_true")
    _add_method(p)
    p.set_defaults(run=cmd_flops)

    p = sub.add_parser("bench", help="decoder prefill latency, vanilla vs a method")
    p.add_argument("model", help="zoo name or checkpoint directory")
    p.add_argument("--random-weights", action="store_true",
                   help="build the model's shapes with random weights (no checkpoint needed)")
    p.add_argument("--layers", type=_int_at_least(1),
                   help="with --random-weights: keep only the first L decoder layers")
    p.add_argument("--share-layers", action="store_true",
                   help="with --random-weights: all layers reuse one layer's weights (full "
                        "depth and compute in one layer's memory)")
    p.add_argument("--n-text", type=_int_at_least(1), default=64)
    p.add_argument("--n-visual", type=_int_at_least(0))
    p.add_argument("--repeats", type=_int_at_least(1), default=5)
    p.add_argument("--warmup", type=_int_at_least(0), default=1)
    p.add_argument("--json", action="store_true")
    _add_runtime(p)
    _add_method(p)
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("lc", help="Layer Contribution analysis: rank layers for freezing")
    p.add_argument("model", help="zoo name, checkpoint directory or Hub repo id")
    p.add_argument("--data", required=True,
                   help='JSONL calibration file: {"image": path or [paths], "prompt": text}')
    p.add_argument("--out", help="write the report (JSON) here")
    p.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib)")
    p.add_argument("--limit", type=_int_at_least(1), help="use only the first N samples")
    p.add_argument("--batch-size", type=_int_at_least(1), default=1,
                   help="samples run together (more memory, faster on GPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    _add_runtime(p)
    p.set_defaults(run=cmd_lc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ShortVError as e:
        print(f"shortv {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so on one line unless asked for the traceback
        if os.environ.get("SHORTV_DEBUG"):
            raise
        print(f"shortv {args.command}: internal error: {e.__class__.__name__}: {e} "
              "(set SHORTV_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
