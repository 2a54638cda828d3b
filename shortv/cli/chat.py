"""`shortv chat`: one answer with --prompt, or an interactive loop that keeps the
conversation."""

from __future__ import annotations

import argparse
import sys

from .options import add_method, add_runtime, float_in, int_at_least, method_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model (one-shot with --prompt)")
    p.add_argument("--model", required=True, help="zoo name, checkpoint directory or Hub repo id")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image (repeat for several)")
    p.add_argument("--prompt", help="answer this and exit (otherwise: an interactive loop)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=512)
    p.add_argument("--temperature", type=float_in(0.0, 100.0), default=0.0)
    p.add_argument("--top-p", type=float_in(0.0, 1.0, open_low=True))
    p.add_argument("--seed", type=int)
    p.add_argument("--no-stream", action="store_true", help="print the answer when complete")
    add_runtime(p)
    add_method(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import load, zoo
    from ..generate import GenerationOptions
    from ..llava import to_pil

    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    method = method_options(args, zoo.card(args.model))  # fail on bad options before loading
    images = [to_pil(path) for path in args.image]  # and on bad files
    model = load(args.model, device=args.device, dtype=args.dtype, **method)
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
