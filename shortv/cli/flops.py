"""`shortv flops`: analytic decoder prefill FLOPs of a method, next to vanilla."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..methods import ShortV
from ..ranking import with_family_defaults
from .options import (
    add_method,
    add_quantize,
    int_at_least,
    method_for,
    method_options,
    model_config,
    print_json,
    quantize_options,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="analytic decoder prefill FLOPs of a method")
    p.add_argument("model", help="zoo name or checkpoint directory")
    p.add_argument("--n-text", type=int_at_least(1), default=64)
    p.add_argument("--n-visual", type=int_at_least(0),
                   help="default: 576 (LLaVA-1.5) / 2880 (LLaVA-NeXT)")
    p.add_argument("--json", action="store_true")
    add_method(p)
    add_quantize(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..flops import default_n_visual, flops_report, format_flops
    from ..models.quant import Quantization, decoder_weight_bytes

    quantization = Quantization.of(**quantize_options(args))
    config, card = model_config(args.model)
    layers = config.text.layers
    note = stand_in = None
    if _unranked_n_frozen(args, card):
        # Which N layers are frozen does not change the count (docs/design.md §8), so a model
        # without a ranking (a card without a published one, a checkpoint directory) is
        # counted with any N layers instead of asking for `shortv lc` first. (Composed with a
        # token-dropping method it does matter: there the ranking is asked for.)
        method_options(args, card)  # the same option checks as every command
        if args.n_frozen > layers:
            raise ConfigError(f"--n-frozen {args.n_frozen} is more than the model's {layers} layers")
        stand_in = ShortV(tuple(range(layers - args.n_frozen, layers)))
        args = argparse.Namespace(**{**vars(args), "n_frozen": None,
                                     "frozen_layers": list(stand_in.layers)})
        note = (f"no ranking needed: any {len(stand_in.layers)} frozen layers cost the same "
                f"(to run ShortV, compute a ranking with `shortv lc {args.model}`)")
    method = method_for(args, layers, card, model_name=card.name if card is not None else args.model)
    method = with_family_defaults(config, method)
    n_visual = default_n_visual(config) if args.n_visual is None else args.n_visual
    report = flops_report(config.text, method, args.n_text, n_visual)
    report["model"] = args.model
    # What decode reads per token: the decoder's weights, dense bfloat16 and as quantized.
    report["decoder_weight_gb"] = round(decoder_weight_bytes(config.text, None) / 1e9, 3)
    if quantization is not None:
        report["quantize"] = quantization.describe()
        quantized = decoder_weight_bytes(config.text, quantization)
        report["quantized_decoder_weight_gb"] = round(quantized / 1e9, 3)
    if stand_in is not None:
        report["method"] = report["method"].replace(stand_in.describe(),
                                                    f"shortv(n_frozen={len(stand_in.layers)})")
        report["note"] = note
    if args.json:
        print_json(report)
    else:
        print(f"{args.model}, {report['method']}, {args.n_text} text + {n_visual} visual tokens: "
              f"{format_flops(report['tflops'])} ({report['percent']}% of vanilla "
              f"{format_flops(report['vanilla_tflops'])}{_paper_percent(report)})"
              + f"; decoder weights {report['decoder_weight_gb']:g} GB in bfloat16"
              + (f", {report['quantized_decoder_weight_gb']:g} GB {report.get('quantize')}" if quantization
                 else "")
              + (f"; {note}" if note else ""))
    return 0


def _paper_percent(report: dict) -> str:
    """The report's `printed_percent` (the paper's convention: the ratio of the one-decimal
    TFLOPs) where it differs from its `percent`, so that the text shows every percentage
    that --json gives."""
    paper = report["printed_percent"]
    if paper is None or paper == report["percent"]:
        return ""
    return f"; {paper}% as the paper prints it, from the one-decimal TFLOPs"


def _unranked_n_frozen(args: argparse.Namespace, card: object) -> bool:
    """--n-frozen N asked for (ShortV alone) without --ranking, and no card ranking to take
    the N from."""
    return (args.n_frozen is not None and args.ranking is None and args.frozen_layers is None
            and tuple(args.method or ("shortv",)) == ("shortv",) and not getattr(card, "ranking", ()))
