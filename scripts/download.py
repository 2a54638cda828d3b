"""Download a zoo model (and the vision tower it needs) into the local weight store.

    python scripts/download.py llava-v1.5-7b            # -> weights/llava-v1.5-7b/
    python scripts/download.py llava-v1.6-vicuna-13b --alternate   # the llava-hf repo instead

Only the files shortv needs are fetched (configs, tokenizer, one weight format), with
progress bars; an interrupted download resumes. $SHORTV_WEIGHTS overrides the store.
"""

from __future__ import annotations

import argparse
import sys

from shortv import zoo
from shortv.errors import ShortVError


def main() -> int:
    parser = argparse.ArgumentParser(description="Download a zoo model into weights/.")
    parser.add_argument("name", help="zoo name (see `shortv zoo`)")
    parser.add_argument("--alternate", action="store_true",
                        help="download the first alternate repo (transformers layout) instead")
    args = parser.parse_args()
    try:
        card = zoo.get_card(args.name)
        repo = card.alternates[0] if args.alternate and card.alternates else card.repo
        if repo is None:
            raise ShortVError(f"{card.name} has no Hub source; it ships with shortv")
        store = zoo.download_dir()
        target = store / zoo.store_name(card.name)
        print(f"{card.name}: {repo} -> {target}")
        zoo.hub_snapshot(repo, local_dir=target, label=card.name)
        # Original LLaVA-1.5 checkpoints carry no vision tower: fetch the tower too.
        if card.vision_tower and not args.alternate and card.config.image_aspect_ratio != "anyres":
            tower = store / zoo.store_name(card.vision_tower)
            print(f"vision tower: {card.vision_tower} -> {tower}")
            zoo.hub_snapshot(card.vision_tower, local_dir=tower, label=card.vision_tower)
    except ShortVError as e:
        print(f"download: error: {e}", file=sys.stderr)
        return 2
    print("done; load it with shortv.load(" + repr(card.name) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
