"""`shortv chat`: one answer with --prompt, or an interactive loop that keeps the
conversation."""

from __future__ import annotations

import argparse
import sys

from .options import add_compile, add_method, add_runtime, add_sampling, generation_options, method_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model (one-shot with --prompt)")
    p.add_argument("--model", required=True, help="zoo name, checkpoint directory or Hub repo id")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image (repeat for several)")
    p.add_argument("--prompt", help="answer this and exit (otherwise: an interactive loop)")
    add_compile(p)
    add_sampling(p, max_new_tokens=512)
    p.add_argument("--no-stream", action="store_true", help="print the answer when complete")
    add_runtime(p)
    add_method(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import load, zoo
    from ..llava import to_pil

    options = generation_options(args)
    method = method_options(args, zoo.card(args.model))  # fail on bad options before loading
    images = [to_pil(path) for path in args.image]  # and on bad files
    model = load(args.model, device=args.device, dtype=args.dtype, **method)
    if args.compile:
        model.compile()
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


def _answer(model, prompt: str, images, history, options, no_stream: bool) -> str:
    if no_stream:
        reply = model.chat(prompt, images, history=history, options=options)
        print(reply)
        return reply
    pieces = []
    for piece in model.chat(prompt, images, history=history, options=options, stream=True):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)
