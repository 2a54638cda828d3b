"""`shortv eval`: answer an LLaVA question file into an LLaVA answer file, scored when the
questions carry answers; data-parallel under torchrun. An existing answer file is resumed
only by the same run (`shortv.eval.provenance`), checked before the model is loaded as far
as the options tell, and again in full once it is."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..paths import output_path
from .options import (
    add_compile,
    add_method,
    add_runtime,
    add_sampling,
    generation_options,
    int_at_least,
    load_options,
    method_for,
    method_options,
    print_json,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="answer a question file (LLaVA's formats), score it")
    p.add_argument("model", help="zoo name, checkpoint directory or Hub repo id")
    p.add_argument("--questions", required=True, metavar="Q.jsonl",
                   help='question file: {"question_id", "image", "text"[, "answer"]} per line')
    p.add_argument("--answers-out", required=True, metavar="A.jsonl",
                   help="answer file to write (resumed if it exists and was written with the "
                        "same model, method, template, generation options and dtype)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the answer file afresh instead of resuming it")
    p.add_argument("--image-folder", metavar="DIR",
                   help="where relative image paths resolve (default: the question file's folder)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1)
    add_compile(p)
    add_sampling(p, max_new_tokens=128)
    p.add_argument("--limit", type=int_at_least(1), help="only the first N questions")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_runtime(p)
    add_method(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import load, parallel, zoo
    from ..eval.answers import AnswerFile
    from ..eval.runner import evaluate
    from ..questions import read_questions

    # Everything that can be wrong with the inputs is found before loading the model.
    options = generation_options(args)
    questions = read_questions(args.questions, image_folder=args.image_folder, limit=args.limit)
    output_path(args.answers_out)
    card = zoo.card(args.model)
    method = method_options(args, card)
    ranks = parallel.start(args.device)
    try:
        device = ranks.device or args.device
        known = _known_before_loading(args, card, options, device)
        parallel.on_main(ranks, lambda: AnswerFile(args.answers_out, questions, known,
                                                   limit=args.limit, overwrite=args.overwrite))
        model = load(args.model, **{**load_options(args), "device": device}, **method)
        if args.compile:
            model.compile()
        summary = evaluate(model, questions, args.answers_out, options=options,
                           batch_size=args.batch_size, ranks=ranks,
                           progress=not (args.quiet or args.json),
                           overwrite=args.overwrite, limit=args.limit)
    finally:
        parallel.stop(ranks)
    if summary is None:  # not rank 0
        return 0
    if summary["answered_now"] == 0:
        print(_nothing_to_do(summary, args.limit), file=sys.stderr)
    if args.json:
        print_json(summary)
    else:
        print(_describe(summary), file=sys.stdout)
    return 0


def _known_before_loading(args: argparse.Namespace, card: Any, options: Any,
                          device: str | None) -> dict[str, Any]:
    """The run's record as far as the options tell without the checkpoint: all of it for
    a zoo model (its card knows the depth and template), else all but method and template."""
    from ..conversation import get_template
    from ..eval import provenance
    from ..loading import resolve_device, resolve_dtype, saved_precision
    from ..models.quant import Quantization

    quantization = Quantization.of(args.quantize, args.group_size)
    dtype = resolve_dtype(args.dtype, resolve_device(device), quantized=quantization is not None)
    saved = saved_precision(args.model) if quantization is None else None
    if saved is not None:  # a quantized checkpoint: its own scheme, and its dtype by default
        quantization, dtype = saved[0], dtype if args.dtype is not None else saved[1]
    if card is None:
        return provenance.build(model=args.model, options=options, dtype=dtype, quantization=quantization)
    # What shortv.load fits the method to, from the same card.
    fitted = method_for(args, card.config.text.layers, card, model_name=card.name)
    return provenance.build(model=card.name, method=fitted, template=get_template(card.template).name,
                            options=options, dtype=dtype, quantization=quantization)


def _nothing_to_do(s: dict[str, Any], limit: int | None) -> str:
    """The note for a run that found every question answered already."""
    held = f"nothing to do: {s['answers']} already holds {s['answers_in_file']} answers"
    if limit is not None and s["answers_in_file"] > s["n"]:
        return f"{held} (the first {s['n']} questions asked by --limit are answered)"
    return f"{held} (every question is answered)"


def _describe(s: dict) -> str:
    parts = [f"{s['model']}, {s['method']}: {s['n']} answers in {s['answers']}"]
    if s["accuracy"] is not None:
        parts.append(f"accuracy {s['accuracy']:.1%} on {s['scored']} scored")
    if s["tflops_ratio"] is not None:
        parts.append(f"prefill {s['tflops_ratio']:.0%} of vanilla FLOPs")
    if s["mean_prefill_ms"] is not None:
        parts.append(f"{s['mean_prefill_ms']:.1f} ms mean prefill per batch")
    if s["decode_tokens_per_s"] is not None:
        parts.append(f"{s['decode_tokens_per_s']:.1f} decode tokens/s")
    parts.append(f"{s['wall_s']:.1f} s")
    return "; ".join(parts)
