"""Download a zoo model (and the vision tower it needs) into the local weight store.

    python scripts/download.py llava-v1.5-7b            # -> weights/llava-v1.5-7b/
    python scripts/download.py llava-v1.6-vicuna-13b --alternate   # the llava-hf repo instead
    python scripts/download.py llava-v1.5-7b --to /data/llava      # another store

A thin wrapper over `shortv.store.download`, which `shortv download NAME` also runs: only the
files shortv needs are fetched (configs, tokenizer, one weight format), with progress bars; an
interrupted download resumes. $SHORTV_WEIGHTS overrides the default store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shortv import store
from shortv.errors import ShortVError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download a zoo model into the weight store.")
    parser.add_argument("name", help="zoo name (see `shortv zoo`) or Hub repo id")
    parser.add_argument("--to", type=Path, default=None,
                        help="weight store to download into (default: $SHORTV_WEIGHTS or weights/)")
    parser.add_argument("--alternate", action="store_true",
                        help="download the first alternate repo (transformers layout) instead")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        for repo, target in store.download_plan(args.name, args.to, alternate=args.alternate):
            print(f"{repo} -> {target}")
        target = store.download(args.name, args.to, alternate=args.alternate, progress=not args.quiet)
    except ShortVError as e:
        print(f"download: error: {e}", file=sys.stderr)
        return 2
    # Loading by name finds only the weight store; a store given with --to is loaded by path.
    found = store.local_weights(args.name)
    how = repr(args.name) if found is not None and found.resolve() == target.resolve() else repr(str(target))
    print(f"done; load it with shortv.load({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
