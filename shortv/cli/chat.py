"""`shortv chat`: one answer with --prompt, or an interactive loop that keeps the
conversation. The answer alone goes to stdout; anything else shortv or torch has to say
goes to stderr, never inside a streamed answer."""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
import warnings

from .options import (
    add_compile,
    add_method,
    add_runtime,
    add_sampling,
    generation_options,
    load_options,
    method_options,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model (one-shot with --prompt)")
    p.add_argument("--model", required=True, help="zoo name, checkpoint directory or Hub repo id")
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image file or http(s) URL (repeat for several)")
    p.add_argument("--prompt", help="answer this and exit (otherwise: an interactive loop)")
    p.add_argument("--template", metavar="NAME",
                   help="conversation template, as LLaVA names them (vicuna_v1, llava_v1, "
                        "mistral_instruct, chatml_direct, ...); default: the zoo card's, else "
                        "the one LLaVA's CLI picks from the model's name")
    add_compile(p)
    add_sampling(p, max_new_tokens=512)
    p.add_argument("--no-stream", action="store_true", help="print the answer when complete")
    add_runtime(p)
    add_method(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import load, zoo
    from ..conversation import get_template
    from ..session import to_pil

    options = generation_options(args)
    card = zoo.card(args.model)
    method = method_options(args, card)  # fail on bad options before loading
    template = get_template(args.template).name if args.template is not None else None  # fails early
    images = [to_pil(source) for source in args.image]  # and on bad files or URLs
    model = load(args.model, template=template, **load_options(args), **method)
    if template is None and card is None:
        # No card: the template the family's own CLI picks for this path (LLaVA's reads the
        # model's name).
        template = model.cli_template(args.model)
        model.template = get_template(template)
    if args.template is None and template == "llava_v0":  # LLaVA's rule found nothing to go on
        print(f"shortv chat: {args.model!r} names no LLaVA version, so LLaVA's CLI rule picks "
              "template llava_v0; for LLaVA-1.5 / NeXT-Vicuna weights pass --template vicuna_v1",
              file=sys.stderr)
    if args.compile:
        if model.device.type == "cpu":
            _hide_cuda_home_notice()
        model.compile()
    warm_up = args.compile  # the first answer's conversation compiles the decode step
    if args.prompt is not None:
        if warm_up:
            _warm_up(model, args.prompt, images, [], options)
        _answer(model, args.prompt, images, [], options, args.no_stream)
        return 0
    print(f"[{model.name}, {model.method.describe()}, template {model.template.name}] "
          "type a message; 'exit' or Ctrl-D ends.", file=sys.stderr)
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
        if warm_up:
            _warm_up(model, prompt, images, history, options)
            warm_up = False
        print("ASSISTANT: ", end="", flush=True)
        reply = _answer(model, prompt, images, history, options, args.no_stream)
        history.append((prompt, reply))


def _hide_cuda_home_notice() -> None:
    """Drop the "No CUDA runtime is found, using CUDA_HOME=..." line torch logs when inductor
    compiles on a machine with a CUDA toolkit but no GPU: a CPU compile does not use it."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not record.getMessage().startswith("No CUDA runtime is found"))


def _warm_up(model, prompt: str, images, history, options) -> None:
    """Compile the decode step on this conversation's own shapes (prefill, one decode step;
    the tokens are thrown away) before its answer streams, so that compiling, and whatever
    torch warns while it does, comes first; one line on stderr says what was done."""
    from ..generate import token_steps

    started = time.perf_counter()
    steps = token_steps(model, [model.encode(prompt, images, history=history)], options)
    for _ in itertools.islice(steps, 3):  # the prompt lengths, the prefill's token, one step
        pass
    steps.close()
    # What LLaVA.compile() chooses by default on this device.
    if model.device.type == "cuda":
        how = "inductor, mode reduce-overhead: CUDA graphs over a static KV cache"
    else:
        how = f"inductor on {model.device.type.upper()}: dynamic shapes, no CUDA graphs"
    print(f"shortv chat: compiled the decode step with torch.compile ({how}) in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def _answer(model, prompt: str, images, history, options, no_stream: bool) -> str:
    if no_stream:
        reply = model.chat(prompt, images, history=history, options=options)
        print(reply)
        return reply
    pieces = []
    # Warnings raised while the answer streams are held back until its line is complete.
    with warnings.catch_warnings(record=True) as caught:
        for piece in model.chat(prompt, images, history=history, options=options, stream=True):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return "".join(pieces)
