"""The serving engine alone (no HTTP): where a request's time goes, per method.

    python scripts/profile_engine.py MODEL [--concurrency 16] [--requests 48] [--max-tokens 8]
        [--methods "vanilla; shortv layers=7,6,5,4; fastv k=2 r=0.5; visionzip budget=64"]
        [--threads 1] [--json]

For each method, one `shortv.serve.Engine` (max batch 16, the feature cache off) on the
model, in this process: --requests greedy requests with the demo picture (the prompts of
scripts/bench_serve.py in turn), at most --concurrency in flight, after 8 unmeasured ones.
Reports requests/s and the seconds spent, summed over the requests, in: encoding
(pixels, tokens), prefill (tower and decoder, the slot write included), the decode steps,
and, on a shortv whose `DecodeState` still has them (before the fixed-slot KV cache), the
KV joins and selects. Run it with PYTHONPATH=<another checkout> to profile that
checkout's engine with this script (BENCHMARKS.md compares against 3e16ca0 that way).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import shortv
from shortv.serve.engine import Engine, Failed, Finished, Job

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import PROMPTS

ROOT = Path(__file__).resolve().parent.parent
PICTURE = ROOT / "weights" / "llava-tiny-demo" / "example.png"
METHODS = "vanilla; shortv layers=7,6,5,4; fastv k=2 r=0.5; visionzip budget=64"


class Timers(dict):
    """Seconds per stage, summed."""

    def wrap(self, owner: Any, name: str, key: str) -> None:
        real = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self[key] = self.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def wrap_pieces(self, owner: Any, name: str, key: str) -> None:
        """A generator method: the time of each of its pieces."""
        real = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            pieces = real(*args, **kwargs)

            def each() -> Any:
                while True:
                    start = time.perf_counter()
                    try:
                        piece = next(pieces)
                    except StopIteration:
                        return
                    finally:
                        self[key] = self.get(key, 0.0) + time.perf_counter() - start
                    yield piece
            return each()

        setattr(owner, name, timed)


def method_of(entry: str, model: shortv.LLaVA) -> shortv.Method:
    name, *pairs = entry.split()
    fields = dict(pair.split("=", 1) for pair in pairs)
    if name == "shortv":
        return shortv.ShortV(tuple(int(i) for i in fields["layers"].split(",")))
    from shortv.ranking import entry_method
    return entry_method(entry, None, model.num_layers)


def run(engine: Engine, model: shortv.LLaVA, count: int, concurrency: int, max_tokens: int) -> float:
    """Seconds for `count` requests, at most `concurrency` in flight."""
    slots = threading.Semaphore(concurrency)
    done = threading.Semaphore(0)
    png = PICTURE.read_bytes()

    def sink(event: object) -> None:
        if isinstance(event, Failed):
            raise SystemExit(f"a request failed: {event.error}")
        if isinstance(event, Finished):
            slots.release()
            done.release()

    start = time.perf_counter()
    for i in range(count):
        slots.acquire()
        image = Image.open(io.BytesIO(png)).convert("RGB")  # as the app decodes a data: URL
        prompt = model.template.render([("<image>\n" + PROMPTS[i % len(PROMPTS)], None)])
        options = shortv.GenerationOptions(max_new_tokens=max_tokens)
        engine.submit(Job(f"r{i}", prompt, [image], options, sink))
    for _ in range(count):
        done.acquire()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--methods", default=METHODS, help="method entries separated by ';'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = shortv.load(args.model, device="cpu")
    model.cache_features(0)
    timers = Timers()
    timers.wrap(model, "encode", "encode_s")
    timers.wrap_pieces(model, "prefill_chunks", "prefill_s")
    from shortv.models.batch import DecodeState
    for name in ("join", "select"):  # a checkout before the fixed-slot KV cache
        if hasattr(DecodeState, name):
            timers.wrap(DecodeState, name, f"kv_{name}_s")
    report = {"model": args.model, "shortv": str(Path(shortv.__file__).parent), "rows": []}
    for entry in (e.strip() for e in args.methods.split(";") if e.strip()):
        model.set_method(method_of(entry, model))
        engine = Engine(model, max_batch=16, max_queue=64, stats_interval=0)
        step: Callable[[], None] = engine._step

        def timed_step(real: Callable[[], None] = step) -> None:
            start = time.perf_counter()
            real()
            timers["decode_s"] = timers.get("decode_s", 0.0) + time.perf_counter() - start

        engine._step = timed_step  # type: ignore[method-assign]
        engine.start()
        try:
            run(engine, model, 8, args.concurrency, args.max_tokens)
            timers.clear()
            wall = run(engine, model, args.requests, args.concurrency, args.max_tokens)
        finally:
            engine.stop()
        s = engine.stats
        row = {"method": entry, "requests_per_s": args.requests / wall, "wall_s": wall, **timers,
               "mean_batch": s.step_rows / max(1, s.steps)}
        report["rows"].append(row)
        if not args.json:
            print(entry, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in row.items() if k != "method"), flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
