"""`shortv flops`: analytic decoder prefill FLOPs of a method, next to vanilla."""

from __future__ import annotations

import argparse

from .options import add_method, int_at_least, method_for, model_config, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="analytic decoder prefill FLOPs of a method")
    p.add_argument("model", help="zoo name or checkpoint directory")
    p.add_argument("--n-text", type=int_at_least(1), default=64)
    p.add_argument("--n-visual", type=int_at_least(0),
                   help="default: 576 (LLaVA-1.5) / 2880 (LLaVA-NeXT)")
    p.add_argument("--json", action="store_true")
    add_method(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..flops import default_n_visual, flops_report, format_flops

    config, card = model_config(args.model)
    method = method_for(args, config.text.layers, card)
    n_visual = default_n_visual(config) if args.n_visual is None else args.n_visual
    report = flops_report(config.text, method, args.n_text, n_visual)
    report["model"] = args.model
    if args.json:
        print_json(report)
    else:
        print(f"{args.model}, {method.describe()}, {args.n_text} text + {n_visual} visual tokens: "
              f"{format_flops(report['tflops'])} ({report['ratio']:.0%} of vanilla "
              f"{format_flops(report['vanilla_tflops'])})")
    return 0
