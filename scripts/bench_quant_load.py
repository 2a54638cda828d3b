"""Loading a big checkpoint quantized: wall time, peak memory and one answer, per scheme.

    python scripts/random_big_checkpoint.py llava-v1.6-vicuna-13b /data/big13b
    python scripts/bench_quant_load.py /data/big13b [--schemes bf16,int8,int4] [--json]

Each scheme loads in a fresh process (`shortv.load(DIR, device="cpu", quantize=...)`,
bfloat16), then answers one prompt about the demo's picture with 8 new tokens. Reported:
load seconds, the process's peak RSS (VmHWM, torch's import included), its RSS before the
load, the bytes of the model's tensors (parameters and buffers), the checkpoint's largest
shard, and the answer's wall time. Peak RSS should stay within 1.15 × the quantized model
plus one shard: the dense weights are never all in memory. A scheme whose load would not
fit is reported as the error the child hit (e.g. killed: out of memory).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, sys, time, torch
import shortv

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
scheme = None if sys.argv[2] == "bf16" else sys.argv[2]
before = rss("VmRSS:")
start = time.perf_counter()
model = shortv.load(sys.argv[1], device="cpu", dtype="bfloat16", quantize=scheme)
seconds = time.perf_counter() - start
peak_load = rss("VmHWM:")
tensors = [*model.module.parameters(), *model.module.buffers()]
size = sum(t.numel() * t.element_size() for t in tensors)
start = time.perf_counter()
answer = model.chat("What is in this picture?", sys.argv[3], max_new_tokens=8)
answer_seconds = time.perf_counter() - start
print(json.dumps({"load_seconds": seconds, "rss_before": before, "peak_rss_load": peak_load,
                  "peak_rss": rss("VmHWM:"), "model_bytes": size, "answer_seconds": answer_seconds,
                  "answer": answer}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--schemes", default="bf16,int8,int4")
    p.add_argument("--image", default=str(ROOT / "weights" / "llava-tiny-demo" / "example.png"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    shards = list(args.checkpoint.glob("*.safetensors"))
    largest = max((s.stat().st_size for s in shards), default=0)
    on_disk = sum(s.stat().st_size for s in shards)
    rows = []
    for scheme in args.schemes.split(","):
        env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
        run = subprocess.run([sys.executable, "-c", CHILD, str(args.checkpoint), scheme, args.image],
                             capture_output=True, text=True, env=env)
        if run.returncode != 0:
            why = "killed (out of memory?)" if run.returncode < 0 else run.stderr.strip().splitlines()[-1]
            rows.append({"scheme": scheme, "error": why})
        else:
            rows.append({"scheme": scheme, **json.loads(run.stdout.strip().splitlines()[-1])})
        print(rows[-1], file=sys.stderr, flush=True)
    report = {"checkpoint": str(args.checkpoint), "on_disk_bytes": on_disk, "largest_shard_bytes": largest,
              "command": "python " + " ".join(sys.argv), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    gb = 1e9
    print(f"{report['command']}: {on_disk / gb:.1f} GB on disk, largest shard {largest / gb:.2f} GB")
    print("| scheme | load s | peak RSS GB | model GB | peak / (1.15 model + shard) | answer s | answer |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['scheme']} | {r['error']} | | | | | |")
            continue
        bound = 1.15 * r["model_bytes"] + largest
        print(f"| {r['scheme']} | {r['load_seconds']:.1f} | {r['peak_rss'] / gb:.2f} | "
              f"{r['model_bytes'] / gb:.2f} | {r['peak_rss_load'] / bound:.2f} | {r['answer_seconds']:.1f} | "
              f"{r['answer']!r} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
