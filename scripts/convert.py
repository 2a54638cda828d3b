"""Convert a checkpoint's PyTorch `.bin` shards to safetensors shards with an index.

    python scripts/convert.py weights/llava-v1.5-7b            # in place, keeps the .bin files
    python scripts/convert.py SRC --out DST --remove-bin

Keys are kept as they are (the layout does not change); tensors are copied one at a time
from memory-mapped shards, so memory stays near the size of the largest shard.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from shortv.checkpoint import BIN_INDEX, read_tensors, weight_files
from shortv.errors import ShortVError


def convert(src: Path, out: Path) -> list[Path]:
    files = [f for f in weight_files(src) if f.suffix == ".bin"]
    if not files:
        raise ShortVError(f"{src} has no .bin weights to convert")
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    written = []
    total = 0
    for i, path in enumerate(files, start=1):
        name = (f"model-{i:05d}-of-{len(files):05d}.safetensors" if len(files) > 1
                else "model.safetensors")
        # Copy out of the memory map: safetensors needs contiguous, unshared tensors.
        shard = {key: tensor.contiguous().clone() for key, tensor in read_tensors(path)}
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        written.append(out / name)
        print(f"{path.name} -> {name} ({len(shard)} tensors)")
        del shard
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if out != src:  # everything else comes along (configs, tokenizer, a tower directory)
        for f in src.iterdir():
            if f.is_dir():
                shutil.copytree(f, out / f.name, dirs_exist_ok=True)
            elif f.suffix != ".bin" and f.name != BIN_INDEX:
                shutil.copy2(f, out / f.name)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description="Convert .bin shards to safetensors.")
    parser.add_argument("src", type=Path)
    parser.add_argument("--out", type=Path, help="output directory (default: in place)")
    parser.add_argument("--remove-bin", action="store_true",
                        help="delete the .bin files and their index afterwards (in place only)")
    args = parser.parse_args()
    out = args.out or args.src
    try:
        bins = [f for f in weight_files(args.src) if f.suffix == ".bin"]
        convert(args.src, out)
        if args.remove_bin and out == args.src:
            for f in bins:
                f.unlink()
            (args.src / BIN_INDEX).unlink(missing_ok=True)
    except ShortVError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
