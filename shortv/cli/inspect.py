"""`shortv inspect`: look inside a model on one picture and prompt: attention from the
last position to the image at a layer (and head), drawn on the picture; which visual tokens
a method keeps, drawn on the picture; the logit lens (`shortv.analysis`)."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .options import add_runtime, load_options, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="attention on the picture, kept tokens, logit lens")
    p.add_argument("model", help="zoo name, checkpoint directory or Hub repo id")
    p.add_argument("--image", required=True, metavar="PATH_OR_URL", help="the picture")
    p.add_argument("--prompt", required=True, help="the question (wrapped in the model's template)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--attention", metavar="LAYER[:HEAD]",
                      help="the last position's attention to the image at LAYER (HEAD, or the mean "
                           "over heads), drawn on the picture")
    what.add_argument("--kept", metavar="METHOD",
                      help="the visual tokens METHOD keeps to the last layer (a method entry, e.g. "
                           "'fastv k=2 r=0.75'), drawn on the picture")
    what.add_argument("--logit-lens", action="store_true",
                      help="each layer's top tokens at the last position (all positions with --json)")
    p.add_argument("--out", metavar="PNG", help="where --attention / --kept write the picture")
    p.add_argument("--top-k", type=int, default=5, help="tokens per layer for --logit-lens")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_runtime(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..session import to_pil

    layer, head = _layer_head(args.attention) if args.attention is not None else (None, None)
    if (args.attention is not None or args.kept is not None) and not args.out:
        raise ConfigError("--attention and --kept draw a picture: give --out FILE.png")
    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: use a positive number")
    image = to_pil(args.image)
    model = load(args.model, **load_options(args))
    method = _method(model, args.kept) if args.kept is not None else None
    enc = model.encode(args.prompt, image)
    if args.logit_lens:
        return _logit_lens(model, enc, args)
    if args.attention is not None:
        report = _attention(model, enc, image, layer, head, args.out)
    else:
        report = _kept(model, enc, image, method, args.out)
    if args.json:
        print_json(report)
    else:
        print(report["summary"])
    return 0


def _layer_head(text: str) -> tuple[int, int | None]:
    parts = text.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--attention {text!r}: use LAYER or LAYER:HEAD, e.g. 2 or 2:0")
    return int(parts[0]), (int(parts[1]) if len(parts) == 2 else None)


def _method(model, entry: str):
    """The method a --kept entry names, fitted to the model (as a served request's)."""
    from ..ranking import entry_method
    from ..zoo import card

    return model.check_method(entry_method(entry.strip(), card(model.name), model.num_layers))


def _attention(model, enc, image, layer: int, head: int | None, out: str) -> dict:
    from ..analysis import heatmap
    from ..token_types import TokenType

    if not 0 <= layer < model.num_layers:
        raise ConfigError(f"--attention {layer}: the model has layers 0..{model.num_layers - 1}")
    _, cache = model.run_with_cache(enc, names=["attn_pattern"], layers=[layer])
    pattern = cache["attn_pattern", layer][0]  # [heads, T, T]
    if head is not None and not 0 <= head < pattern.shape[0]:
        raise ConfigError(f"--attention {layer}:{head}: the model has heads 0..{pattern.shape[0] - 1}")
    row = pattern[:, -1] if head is None else pattern[head, -1][None]
    visual = cache.types[0] == int(TokenType.VISUAL)
    scores = row.mean(dim=0)[visual]
    heatmap(model, enc, scores, image)[0].save(out)
    which = "mean over heads" if head is None else f"head {head}"
    return {"layer": layer, "head": head, "out": out, "image_attention": float(scores.sum()),
            "summary": f"layer {layer}, {which}: the last position gives {float(scores.sum()):.3f} of its "
                       f"attention to the image; map written to {out}"}


def _kept(model, enc, image, method, out: str) -> dict:
    from ..analysis import heatmap
    from ..token_types import TokenType

    model.set_method(method)
    if model.method.reduces_images:
        raise ConfigError(f"{model.method.describe()} merges the image's tokens before the language model; "
                          "--kept draws the tokens a method drops in the decoder (fastv, pdrop, dart, ...)")
    last = model.num_layers - 1
    _, cache = model.run_with_cache(enc, names=["resid_pre"], layers=[last])
    visual = cache.types[0] == int(TokenType.VISUAL)
    kept = cache.present["resid_pre", last][0][visual].double()
    heatmap(model, enc, kept, image)[0].save(out)
    n = int(kept.sum())
    return {"method": model.method.describe(), "kept": n, "visual": int(visual.sum()), "out": out,
            "summary": f"{model.method.describe()} keeps {n} of {int(visual.sum())} visual tokens to the "
                       f"last layer; map written to {out}"}


def _logit_lens(model, enc, args: argparse.Namespace) -> int:
    from ..analysis import logit_lens

    lens = logit_lens(model, enc, top_k=args.top_k)
    if args.json:
        print_json(lens.as_dict(model))
        return 0
    tokenizer = model.require_tokenizer()
    for li, layer in enumerate(lens.layers):
        top = ", ".join(f"{tokenizer.decode([int(i)])!r} {float(p):.2f}"
                        for i, p in zip(lens.token_ids[li, -1], lens.probs[li, -1], strict=True))
        print(f"layer {layer}: {top}")
    return 0
