"""Loading benchmark: wall time and peak memory of `shortv.load` per checkpoint format.

    python scripts/bench_load.py [--layers 8] [--hidden 1024] [--repeats 3] [--json]

Writes one random LLaVA-1.5-shaped checkpoint (original layout, fp32, a few hundred MB)
in four formats — safetensors single file / 4 shards, PyTorch .bin single file / 4
shards — and loads each in a fresh process, on CPU, in fp32 (no cast) and bf16 (cast
while loading). Memory is the process's peak RSS during the load minus its RSS before
(torch's own import footprint is not the model's), divided by the checkpoint's size on
disk. The target is <= 1.3: the weights are never held twice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_checkpoint

CHILD = r"""
import json, sys, time, torch
import shortv

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = rss("VmRSS:")
start = time.perf_counter()
model = shortv.load(sys.argv[1], device="cpu", dtype=sys.argv[2])
seconds = time.perf_counter() - start
params = sum(p.numel() * p.element_size() for p in model.module.parameters())
print(json.dumps({"seconds": seconds, "before": before, "peak": rss("VmHWM:"),
                  "after": rss("VmRSS:"), "param_bytes": params}))
"""


def size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


VOCAB = 32000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    text = {**random_checkpoint.TEXT, "hidden_size": args.hidden,
            "intermediate_size": args.hidden * 11 // 4, "num_hidden_layers": args.layers,
            "num_attention_heads": args.hidden // 64, "num_key_value_heads": args.hidden // 64}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, shards in (("safetensors", 1), ("safetensors", 4), ("bin", 1), ("bin", 4)):
            path = random_checkpoint.write(Path(tmp) / f"{fmt}-{shards}", text,
                                           random_checkpoint.VISION, VOCAB, fmt=fmt, shards=shards)
            disk = size_on_disk(path)
            for dtype in ("float32", "bfloat16"):
                runs = []
                for _ in range(args.repeats):
                    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype],
                                         capture_output=True, text=True)
                    if out.returncode:  # say why, not just that the child failed
                        sys.exit(f"loading {path} ({dtype}) failed:\n{out.stderr[-3000:]}")
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                rows.append({
                    "format": fmt, "shards": shards, "dtype": dtype, "checkpoint_mb": disk / 1e6,
                    "model_mb": runs[0]["param_bytes"] / 1e6,
                    "load_s": statistics.median(r["seconds"] for r in runs),
                    "peak_rss_over_checkpoint": statistics.median(
                        (r["peak"] - r["before"]) / disk for r in runs),
                })
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    print(f"{'format':<12} {'shards':>6} {'dtype':<9} {'ckpt MB':>8} {'model MB':>9} "
          f"{'load s':>7} {'peak RSS / ckpt':>15}")
    for r in rows:
        print(f"{r['format']:<12} {r['shards']:>6} {r['dtype']:<9} {r['checkpoint_mb']:>8.0f} "
              f"{r['model_mb']:>9.0f} {r['load_s']:>7.2f} {r['peak_rss_over_checkpoint']:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
