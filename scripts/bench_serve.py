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

Against transformers (issue 25): --transformers DIR also starts `transformers serve DIR
--continuous-batching --device cpu --dtype float32` (--transformers-args replaces the
--continuous-batching; --device / --dtype apply to it too, float32 on CPU by default) as
the variant "transformers", on a free port, and implies --stream. DIR should be a llava-hf
directory that the shortv servers serve too (scripts/llava_hf_demo.py writes the demo as
one), e.g.

    python scripts/llava_hf_demo.py --check
    OMP_NUM_THREADS=1 python scripts/bench_serve.py weights/llava-tiny-demo-hf \
        --transformers weights/llava-tiny-demo-hf --variant shortv="--feature-cache-mb 0" \
        --max-tokens 32 --rounds 2

transformers 5.25 generates for one request at a time when the model is a VLM: its
--continuous-batching covers LLMs only (cli/serving/utils.py GenerationState.
use_continuous_batching: "Only LLMs support continuous batching. Falling back to sequential
generation."; its batching manager takes token ids alone, no pixel values).
--stream sends streamed requests (the `openai` client when installed, else httpx reading
the server-sent events; --client picks) and adds, per variant and C: time to first token
p50 / p99 and inter-token latency p50 / p99 (the gaps between content chunks), all rounds'
requests pooled; every answer must be non-empty.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import shutil
import socket
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def transformers_command() -> list[str]:
    """The `transformers` CLI of this interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / "transformers"
    found = str(beside) if beside.exists() else shutil.which("transformers")
    if found is None:
        raise SystemExit('no `transformers` CLI: pip install "transformers[serving]"')
    return [found]


def start_transformers(model: str, args: list[str], folder: Path) -> tuple[subprocess.Popen, str, Path]:
    """`transformers serve MODEL ARGS` on a free port; up once /v1/models says the model is loaded."""
    port = free_port()
    log = folder / "transformers.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*transformers_command(), "serve", model, "--host", "127.0.0.1",
                                 "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            listed = httpx.get(url + "/v1/models", timeout=5).json()["data"]
            if listed and listed[0].get("status", {}).get("value", "loaded") == "loaded":
                return proc, url, log
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the transformers server did not start:\n{log.read_text()}")


def served_model(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line and not line.startswith("#"))}


def request_body(model: str, image_url: str, i: int, max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
                                     {"type": "image_url", "image_url": {"url": image_url}}]}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


class Streamed:
    """One streamed answer as the client saw it: when each content chunk arrived (seconds
    after the request was sent), its text, and the server's completion token count."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.text = ""
        self.tokens: int | None = None

    def piece(self, t: float, content: str | None) -> None:
        if content:
            self.times.append(t)
            self.text += content


def ask_openai(client: object, body: dict) -> Streamed:
    """A streamed request through the official `openai` client."""
    got = Streamed()
    t0 = time.perf_counter()
    for chunk in client.chat.completions.create(**body):
        now = time.perf_counter() - t0
        if chunk.choices:
            got.piece(now, chunk.choices[0].delta.content)
        if chunk.usage is not None:
            got.tokens = chunk.usage.completion_tokens
    return got


def ask_httpx(http: httpx.Client, body: dict) -> Streamed:
    """A streamed request over httpx, reading the server-sent events by hand."""
    got = Streamed()
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            now = time.perf_counter() - t0
            if "error" in event:
                raise SystemExit(f"request failed: {event['error']}")
            if event.get("choices"):
                got.piece(now, event["choices"][0].get("delta", {}).get("content"))
            if event.get("usage"):
                got.tokens = event["usage"]["completion_tokens"]
    return got


def run_load(url: str, model: str, image_url: str, concurrency: int, requests: int,
             max_tokens: int, stream: bool = False, client: str = "httpx",
             shortv_metrics: bool = True) -> dict[str, float | list[float]]:
    """`requests` requests from `concurrency` threads; latencies in ms and throughputs.
    With `stream`, also each request's time to first token and its inter-token gaps (ms)."""
    bodies = [request_body(model, image_url, i, max_tokens, stream) for i in range(requests)]
    latencies: list[float] = []
    ttft: list[float] = []
    itl: list[float] = []
    empty: list[str] = []
    answers: dict[str, set[tuple[str, int]]] = {}
    tokens = [0]
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url, timeout=600, limits=limits) as http:
        if stream and client == "openai":
            import openai

            api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                                http_client=httpx.Client(timeout=600, limits=limits))

        def ask(body: dict) -> None:
            t0 = time.perf_counter()
            if stream:
                got = ask_openai(api, body) if client == "openai" else ask_httpx(http, body)
                text, n = got.text, got.tokens if got.tokens is not None else len(got.times)
            else:
                r = http.post("/v1/chat/completions", content=json.dumps(body),
                              headers={"content-type": "application/json"})
                if r.status_code != 200:
                    raise SystemExit(f"request failed: {r.status_code} {r.text}")
                text, n = r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"]
            ms = 1000 * (time.perf_counter() - t0)
            with lock:
                latencies.append(ms)
                tokens[0] += n
                prompt = body["messages"][0]["content"][0]["text"]
                answers.setdefault(prompt, set()).add((text, n))
                if not text.strip():
                    empty.append(prompt)
                if stream and got.times:
                    ttft.append(1000 * got.times[0])
                    itl.extend(1000 * (b - a) for a, b in zip(got.times, got.times[1:], strict=False))

        before = metrics(url) if shortv_metrics else {}
        start_ = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(ask, bodies))
        wall = time.perf_counter() - start_
        after = metrics(url) if shortv_metrics else {}
        if stream and client == "openai":
            api.close()
    if empty and stream:
        raise SystemExit(f"{url}: {len(empty)} empty answer(s), e.g. to {empty[0]!r}")
    steps = after.get("shortv_decode_steps_total", 0) - before.get("shortv_decode_steps_total", 0)
    rows = after.get("shortv_decode_rows_total", 0) - before.get("shortv_decode_rows_total", 0)
    return {"rps": requests / wall, "tok_s": tokens[0] / wall, "latencies": latencies,
            "ttft": ttft, "itl": itl, "tokens": tokens[0], "answers": answers,
            "mean_batch": rows / steps if steps else (0.0 if shortv_metrics else None)}


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
    parser.add_argument("--transformers", metavar="MODEL",
                        help="also start `transformers serve MODEL` (a llava-hf directory); implies --stream")
    parser.add_argument("--transformers-args", default="--continuous-batching",
                        help="its options besides --device / --dtype / --host / --port")
    parser.add_argument("--stream", action="store_true",
                        help="streamed requests: adds time to first token and inter-token latency")
    parser.add_argument("--client", choices=["auto", "openai", "httpx"], default="auto",
                        help="streaming client (auto: openai when installed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    stream = args.stream or bool(args.transformers)
    client = args.client
    if client == "auto":
        try:
            import openai  # noqa: F401
            client = "openai"
        except ImportError:
            client = "httpx"
    image_url = "data:image/png;base64," + base64.b64encode(Path(args.image).read_bytes()).decode()
    common = [*(["--device", args.device] if args.device else []),
              *(["--dtype", args.dtype] if args.dtype else []),
              "--max-batch", str(args.max_batch), "--max-queue", str(max(levels) * 2),
              "--stats-interval", "0"]
    procs = []
    foreign: set[str] = set()  # servers without shortv's /metrics
    try:
        if args.url:
            servers = {"server": args.url.rstrip("/")}
        else:
            folder = Path(tempfile.mkdtemp(prefix="bench_serve_"))
            variants = ({"vanilla": ["--method", "vanilla"], "shortv": shlex.split(args.shortv_args)}
                        if not args.variant else dict(_variant(v) for v in args.variant))
            servers = {}
            for name, extra in variants.items():
                proc, url, _ = start(args.model, [*common, *extra], folder, name)
                procs.append(proc)
                servers[name] = url
            if args.transformers:
                options = [*shlex.split(args.transformers_args), "--device", args.device or "cpu",
                           "--dtype", args.dtype or "float32"]
                proc, url, _ = start_transformers(args.transformers, options, folder)
                procs.append(proc)
                servers["transformers"] = url
                foreign.add("transformers")
        models = {name: served_model(url) for name, url in servers.items()}

        def load(name: str, c: int, n: int) -> dict:
            return run_load(servers[name], models[name], image_url, c, n, args.max_tokens, stream=stream,
                            client=client, shortv_metrics=name not in foreign)

        for name in servers:
            load(name, min(4, max(levels)), args.warmup)
        results: dict[tuple[str, int], list[dict]] = {}
        for c in levels:
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    results.setdefault((name, c), []).append(load(name, c, args.requests))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    rows = []
    for (name, c), runs in results.items():
        latencies = [ms for run in runs for ms in run["latencies"]]
        batches = [run["mean_batch"] for run in runs if run["mean_batch"] is not None]
        row = {"variant": name, "concurrency": c,
               "requests_per_s": statistics.median(run["rps"] for run in runs),
               "tokens_per_s": statistics.median(run["tok_s"] for run in runs),
               "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
               "mean_batch": statistics.median(batches) if batches else None,
               "tokens_per_request": sum(run["tokens"] for run in runs) / len(latencies),
               "rps_rounds": [run["rps"] for run in runs]}
        if stream:
            ttft = [ms for run in runs for ms in run["ttft"]]
            itl = [ms for run in runs for ms in run["itl"]]
            row |= {"ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
                    "itl_p50_ms": percentile(itl, 50) if itl else None,
                    "itl_p99_ms": percentile(itl, 99) if itl else None}
        seen: dict[str, set] = {}
        for run in runs:
            for prompt, said in run["answers"].items():
                seen.setdefault(prompt, set()).update(said)
        row["answers"] = {prompt: sorted(said) for prompt, said in seen.items()}
        rows.append(row)
    order = list(dict.fromkeys(name for name, _ in results))
    rows.sort(key=lambda row: (row["concurrency"], row["variant"] != "vanilla", order.index(row["variant"])))
    model = " / ".join(dict.fromkeys(models.values()))
    texts = {row["variant"]: {p: {t for t, _ in said} for p, said in row["answers"].items()} for row in rows}
    agree = len({json.dumps({p: sorted(t) for p, t in by.items()}, sort_keys=True)
                 for by in texts.values()}) == 1
    if args.json:
        print(json.dumps({"model": model, "requests": args.requests, "rounds": args.rounds,
                          "max_tokens": args.max_tokens, "stream": stream,
                          "client": client if stream else "httpx", "answers_agree": agree, "rows": rows},
                         indent=2))
        return 0
    print(f"{model}: {args.requests} requests x {args.rounds} rounds per cell, max_tokens {args.max_tokens}"
          + (f", streamed ({client} client)" if stream else ""))
    extra = " TTFT p50 / p99 ms | ITL p50 / p99 ms |" if stream else ""
    print(f"| clients | variant | requests/s | generated tokens/s | p50 ms | p95 ms |{extra} mean batch |")
    print("| --- " * (7 + 2 * stream) + "|")
    for row in rows:
        cells = ""
        if stream:
            itl = ("n/a" if row["itl_p50_ms"] is None
                   else f"{row['itl_p50_ms']:.1f} / {row['itl_p99_ms']:.1f}")
            cells = f" {row['ttft_p50_ms']:.0f} / {row['ttft_p99_ms']:.0f} | {itl} |"
        batch = "n/a" if row["mean_batch"] is None else f"{row['mean_batch']:.1f}"
        print(f"| {row['concurrency']} | {row['variant']} | {row['requests_per_s']:.1f} | "
              f"{row['tokens_per_s']:.0f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} |{cells} {batch} |")
    print("answers (text, completion tokens) per variant:")
    for name in order:
        said = next(row["answers"] for row in rows if row["variant"] == name)
        print(f"  {name}: " + "; ".join(f"{p!r} -> {a}" for p, a in sorted(said.items())))
    print("the variants' answers agree" if agree else "the variants' answers DIFFER")
    return 0


if __name__ == "__main__":
    sys.exit(main())
