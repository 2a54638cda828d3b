"""Serving throughput and latency of `shortv serve`: vanilla against ShortV.

    python scripts/bench_serve.py [MODEL] [--concurrency 1,4,16] [--requests 64] [--rounds 3]
        [--max-tokens 64] [--image PATH] [--shortv-args "--method shortv"] [--device D]
        [--dtype D] [--max-batch B] [--variant NAME=ARGS ...] [--url URL] [--json]

Starts one server per variant (`python -m shortv serve MODEL --port 0 ...`; vanilla, and
ShortV with --shortv-args, by default the card's paper N), both up at once but only one
under load at a time. For each concurrency C, C client threads send --requests greedy
chat requests (the prompts below in turn, with --image as a data: URL) over keep-alive
HTTP; rounds alternate the variants' order (A B, B A, ...). Reports, per variant and C:
requests/s and generated tokens/s (median over rounds), p50 / p95 request latency (all
rounds' requests pooled), and the mean batch the engine decoded (from /metrics).
--variant NAME=ARGS (repeatable) replaces the two default variants by servers started with
those options, e.g. `--variant eager="" --variant compiled="--compile"`.
--url benchmarks a server that is already running instead (one variant, "server").
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is in this picture?",
    "Describe the picture.",
    "What shapes do you see?",
    "What colour is the circle on the left of the picture? Answer in one word.",
]


def start(model: str, args: list[str], folder: Path, name: str) -> tuple[subprocess.Popen, str, Path]:
    log = folder / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shortv", "serve", model, "--port", "0", *args],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = re.search(r"on (http://[\d.]+:\d+)/v1", log.read_text())
        if found:
            return proc, found.group(1), log
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the {name} server did not start:\n{log.read_text()}")


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line and not line.startswith("#"))}


def run_load(url: str, model: str, image_url: str, concurrency: int, requests: int,
             max_tokens: int) -> dict[str, float | list[float]]:
    """`requests` requests from `concurrency` threads; latencies in ms and throughputs."""
    bodies = [json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
                                     {"type": "image_url", "image_url": {"url": image_url}}]}]})
              for i in range(requests)]
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        def ask(body: str) -> None:
            t0 = time.perf_counter()
            r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            ms = 1000 * (time.perf_counter() - t0)
            if r.status_code != 200:
                raise SystemExit(f"request failed: {r.status_code} {r.text}")
            with lock:
                latencies.append(ms)
                tokens[0] += r.json()["usage"]["completion_tokens"]

        before = metrics(url)
        start_ = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(ask, bodies))
        wall = time.perf_counter() - start_
        after = metrics(url)
    steps = after["shortv_decode_steps_total"] - before["shortv_decode_steps_total"]
    rows = after["shortv_decode_rows_total"] - before["shortv_decode_rows_total"]
    return {"rps": requests / wall, "tok_s": tokens[0] / wall, "latencies": latencies,
            "tokens": tokens[0], "mean_batch": rows / steps if steps else 0.0}


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, options = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=SERVE-OPTIONS")
    return name, shlex.split(options)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="llava-tiny-demo")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=64, help="per concurrency and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=8, help="requests per server before measuring")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image", default=str(ROOT / "weights" / "llava-tiny-demo" / "example.png"))
    parser.add_argument("--shortv-args", default="--method shortv",
                        help="the ShortV server's method options (default: the card's paper N)")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--variant", action="append", metavar="NAME=ARGS",
                        help="a server to start with these serve options, instead of vanilla and shortv")
    parser.add_argument("--url", help="benchmark this running server instead of starting two")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    image_url = "data:image/png;base64," + base64.b64encode(Path(args.image).read_bytes()).decode()
    common = [*(["--device", args.device] if args.device else []),
              *(["--dtype", args.dtype] if args.dtype else []),
              "--max-batch", str(args.max_batch), "--max-queue", str(max(levels) * 2),
              "--stats-interval", "0"]
    procs = []
    try:
        if args.url:
            servers = {"server": args.url.rstrip("/")}
            model = httpx.get(servers["server"] + "/v1/models", timeout=30).json()["data"][0]["id"]
        else:
            folder = Path(tempfile.mkdtemp(prefix="bench_serve_"))
            variants = ({"vanilla": ["--method", "vanilla"], "shortv": shlex.split(args.shortv_args)}
                        if not args.variant else dict(_variant(v) for v in args.variant))
            servers = {}
            for name, extra in variants.items():
                proc, url, _ = start(args.model, [*common, *extra], folder, name)
                procs.append(proc)
                servers[name] = url
            model = args.model
        for url in servers.values():
            run_load(url, model, image_url, min(4, max(levels)), args.warmup, args.max_tokens)
        results: dict[tuple[str, int], list[dict]] = {}
        for c in levels:
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    results.setdefault((name, c), []).append(
                        run_load(servers[name], model, image_url, c, args.requests, args.max_tokens))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    rows = []
    for (name, c), runs in results.items():
        latencies = [ms for run in runs for ms in run["latencies"]]
        rows.append({"variant": name, "concurrency": c,
                     "requests_per_s": statistics.median(run["rps"] for run in runs),
                     "tokens_per_s": statistics.median(run["tok_s"] for run in runs),
                     "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
                     "mean_batch": statistics.median(run["mean_batch"] for run in runs),
                     "tokens_per_request": sum(run["tokens"] for run in runs) / len(latencies)})
    rows.sort(key=lambda row: (row["concurrency"], row["variant"] != "vanilla"))
    if args.json:
        print(json.dumps({"model": model, "requests": args.requests, "rounds": args.rounds, "rows": rows},
                         indent=2))
        return 0
    print(f"{model}: {args.requests} requests x {args.rounds} rounds per cell, max_tokens {args.max_tokens}")
    print("| clients | variant | requests/s | generated tokens/s | p50 ms | p95 ms | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['concurrency']} | {row['variant']} | {row['requests_per_s']:.1f} | "
              f"{row['tokens_per_s']:.0f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
              f"{row['mean_batch']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
