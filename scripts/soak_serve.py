"""A randomized stream of requests against `shortv serve`: recompiles and memory over time.

    python scripts/soak_serve.py [MODEL] [--requests 2000] [--concurrency 8]
        [--serve-args "--compile"] [--seed 0] [--max-seconds 3600] [--json]

Starts `python -m shortv serve MODEL --port 0 SERVE_ARGS` on loopback and sends --requests
chat requests from --concurrency client threads: each request draws, from a seeded
generator, a prompt, whether it carries a picture (one of 16 generated ones, so the
feature cache both hits and misses), max_tokens (1 to 64), greedy or sampled, and whether
its client goes away mid-stream (5 %). Every tenth of the run it reads /metrics: resident
memory, requests by outcome, decode steps, compiles after warm-up. Reports the RSS at the
first sample (after the first tenth, when the allocator has settled), its largest growth
after that, the compiles after warm-up (must be 0) and any request that failed (must be
none). Exits 1 when a request failed or a graph was compiled after warm-up.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import shlex
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import PROMPTS, start


def picture(i: int) -> str:
    """A data: URL of one of 16 pictures (a circle and a square, colours by i)."""
    image = Image.new("RGB", (224 + 16 * (i % 4), 224), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 60, 100, 140), fill=((40 * i) % 256, 80, 200))
    draw.rectangle((130, 60, 200, 130), fill=(200, (60 * i) % 256, 40))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def request(url: str, model: str, rng: random.Random, pictures: list[str]) -> str:
    """One randomized request; its outcome: "ok", "left" (the client went away) or an error."""
    content: list[dict] = [{"type": "text", "text": rng.choice(PROMPTS)}]
    if rng.random() < 0.8:
        content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(pictures)}})
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": rng.randint(1, 64), "temperature": rng.choice([0.0, 0.0, 0.7]),
            "seed": rng.randrange(1000), "stream": True}
    leave = rng.random() < 0.05
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.read()[:300]!r}"
        for line in response.iter_lines():
            if leave and line.startswith("data: {"):
                return "left"
            if line == "data: [DONE]":
                return "ok"
    return "the stream ended without [DONE]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="llava-tiny-demo")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--serve-args", default="", help="options for shortv serve, one string")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="stop sending after this long (the report says how many were sent)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pictures = [picture(i) for i in range(16)]
    with tempfile.TemporaryDirectory() as folder:
        proc, url, log = start(args.model, shlex.split(args.serve_args), Path(folder), "serve")
        try:
            served = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            outcomes: dict[str, int] = {}
            errors: list[str] = []
            samples: list[dict[str, float]] = []
            lock = threading.Lock()
            sent = 0
            began = time.monotonic()
            every = max(1, args.requests // 10)

            def one(i: int) -> None:
                nonlocal sent
                if time.monotonic() - began > args.max_seconds:
                    return
                outcome = request(url, served, random.Random(args.seed * 1_000_003 + i), pictures)
                with lock:
                    sent += 1
                    key = outcome if outcome in ("ok", "left") else "error"
                    outcomes[key] = outcomes.get(key, 0) + 1
                    if key == "error":
                        errors.append(outcome)
                    if sent % every == 0:
                        seconds = time.monotonic() - began
                        samples.append({"requests": sent, "seconds": seconds, **metrics(url)})

            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(one, range(args.requests)))
            final = metrics(url)
        finally:
            proc.terminate()
            proc.wait(60)
        rss = [s.get("process_resident_memory_bytes", 0.0) for s in samples]
        report = {
            "model": args.model, "serve_args": args.serve_args, "requests": sent,
            "concurrency": args.concurrency, "seconds": round(time.monotonic() - began, 1),
            "outcomes": outcomes, "errors": errors[:5],
            "compiles_after_warm_up": final.get("shortv_compiles_after_warm_up_total", 0.0),
            "kv_cache_mib": round(final.get("shortv_kv_cache_bytes", 0.0) / 2**20, 1),
            "rss_mib": [round(r / 2**20, 1) for r in rss],
            "rss_growth_after_first_tenth_mib": round((max(rss) - rss[0]) / 2**20, 1) if rss else None,
            "warm_up_log": [line for line in log.read_text().splitlines()
                            if "warm-up" in line or "KV cache" in line],
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 1 if errors or report["compiles_after_warm_up"] else 0


if __name__ == "__main__":
    sys.exit(main())
