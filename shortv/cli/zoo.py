"""`shortv zoo`: the zoo's models, and `shortv download`: a model into the weight store."""

from __future__ import annotations

import argparse
from typing import Any

from .options import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="list the zoo's models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)

    p = sub.add_parser("download", help="download a zoo model (or Hub repo) into the weight store")
    p.add_argument("model", help="zoo name or Hub repo id")
    p.add_argument("--to", metavar="DIR",
                   help="weight store folder (default: $SHORTV_WEIGHTS, else the source tree's weights/, "
                        "else ~/.cache/shortv/weights)")
    p.set_defaults(run=run_download)


def run(args: argparse.Namespace) -> int:
    from .. import zoo

    cards = zoo.cards()
    if args.json:
        print_json({"models": [_summary(c) for c in cards]})
        return 0
    rows = [("name", "layers", "heads/kv", "images", "template", "N", "ranking", "weights",
             "source")]
    for c in cards:
        s = _summary(c)
        rows.append((c.name, str(s["layers"]), f"{s['heads']}/{s['kv_heads']}",
                     s["image_aspect_ratio"], c.template, str(s["n_frozen"] or "-"),
                     _ranking_origin(c), "local" if s["local_weights"] else "hub",
                     c.repo or "embedded"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if any(not c.ranking for c in cards):
        print("\nranking \"none\": no published ranking; compute one with "
              "`shortv lc NAME --data calib.jsonl --out lc.json`, then freeze with "
              "`--ranking lc.json --n-frozen N`")
    return 0


def _summary(card) -> dict[str, Any]:
    """The card's summary and where its weights are, if the local store has them."""
    from ..store import local_weights

    found = local_weights(card.name)
    return {**card.summary(), "local_weights": str(found) if found else None}


def _ranking_origin(card) -> str:
    return {"none": "none (run shortv lc)"}.get(card.ranking_origin, card.ranking_origin)


def run_download(args: argparse.Namespace) -> int:
    from ..store import download

    path = download(args.model, to=args.to)
    print(f"{args.model} is in {path}")
    return 0
