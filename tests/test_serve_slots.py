"""The engine on its fixed slot cache: memory planned at start, requests that can never fit
refused before any decoding, answers that reach their slot's end finished with "length",
and every slot free again after a mixed stream (no slot leaks, whatever ends a request).
Eager decode; the compiled engine is tests/test_serve_compile.py's."""

from __future__ import annotations

import random

import pytest
import torch

import shortv
from shortv.serve import Engine, Job
from shortv.serve.engine import Failed, Finished

from .data import PROMPTS, picture
from .engine_jobs import run_jobs


@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    return shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)


def ask(engine: Engine, jobs: list[Job], *, cancel: frozenset[str] = frozenset()) -> dict[str, object]:
    """Submit every job at once (cancelling those in `cancel`); each other one's end."""
    return run_jobs(engine, [(job, 0.0) for job in jobs], cancel=cancel)


def job(model: shortv.LLaVA, name: str, question: str, *, image: bool = True, max_tokens: int = 8,
        strict: bool = False, no_eos: bool = False) -> Job:
    text = model.template.render([(("<image>\n" if image else "") + question, None)])
    return Job(name, text, [picture(0)] if image else [], shortv.GenerationOptions(max_new_tokens=max_tokens),
               lambda event: None, strict_budget=strict,
               logit_bias={model.tokenizer.eos_id: -100.0} if no_eos else {})


def test_the_plan_is_what_is_allocated(demo):
    engine = Engine(demo, max_batch=3, max_context=128, stats_interval=0)
    c = demo.config.text
    assert engine.kv_plan.nbytes == 2 * c.layers * 3 * c.kv_heads * 128 * c.head_dim * 4
    assert engine._state.cache.nbytes == engine.kv_plan.nbytes
    with pytest.raises(ValueError, match="max_context"):
        Engine(demo, max_context=c.max_position_embeddings + 1)


def test_slot_limits(demo):
    """--max-context 100 and a prompt of 80 positions (36 visual): max_tokens 60 without
    strictness ends with "length" at the slot's end (20 tokens); strict, it is a 400 naming
    --max-context; a prompt longer than a slot is a 400 before its decoder runs; a short
    request beside them is answered as alone."""
    engine = Engine(demo, max_batch=4, max_context=100, stats_interval=0)
    engine.start()
    try:
        alone = demo.chat("Hi.", max_new_tokens=8)
        n = len(demo.prepare([demo.encode(PROMPTS[0], [picture(0)])]).types[0])
        events = ask(engine, [
            job(demo, "fills", PROMPTS[0], max_tokens=60, no_eos=True),
            job(demo, "strict", PROMPTS[0], max_tokens=60, strict=True),
            job(demo, "huge", PROMPTS[0] + " Please." * 40),
            job(demo, "short", "Hi.", image=False),
        ])
    finally:
        engine.stop()
    fills = events["fills"]
    assert isinstance(fills, Finished) and fills.reason == "length"
    assert fills.completion_tokens == 100 - n
    strict = events["strict"]
    assert isinstance(strict, Failed) and strict.error.status == 400
    assert strict.error.message == (
        f"the prompt has {n} tokens after expanding its images and max_tokens is 60: {n + 60} is more "
        f"than the 100 positions this server holds per request (--max-context); ask for at most {100 - n}")
    huge = events["huge"]
    assert isinstance(huge, Failed) and huge.error.status == 400
    assert huge.error.code == "context_length_exceeded"
    assert "at most 100 (prompt and answer; the server's --max-context)" in huge.error.message
    assert isinstance(events["short"], Finished) and events["short"].text == alone
    assert engine._state.cache.live == [False] * 4 and engine._slots == [None] * 4


def test_no_slot_leaks_after_a_mixed_stream(demo):
    """Finished, failed (too long) and cancelled requests, arriving together: afterwards
    every slot is free, and the next request is answered exactly as alone."""
    rng = random.Random(0)
    engine = Engine(demo, max_batch=3, max_prefill=2, max_context=120, stats_interval=0)
    jobs = []
    for i in range(14):
        kind = rng.choice(["ok", "ok", "long", "cancel"])
        question = PROMPTS[rng.randrange(4)] + (" Please." * 30 if kind == "long" else "")
        jobs.append(job(demo, f"{kind}{i}", question, max_tokens=rng.choice([1, 4, 9])))
    engine.start()
    try:
        events = ask(engine, jobs, cancel=frozenset(j.id for j in jobs if j.id.startswith("cancel")))
        last = ask(engine, [job(demo, "after", "Hi.", image=False)])
    finally:
        engine.stop()
    assert {name for name in events if not name.startswith("cancel")} == \
        {j.id for j in jobs if not j.id.startswith("cancel")}
    assert all(isinstance(e, Failed) == name.startswith("long") for name, e in events.items())
    assert any(j.id.startswith("cancel") for j in jobs) and any(j.id.startswith("long") for j in jobs)
    assert isinstance(last["after"], Finished) and last["after"].text == demo.chat("Hi.", max_new_tokens=8)
    assert engine._state.cache.live == [False] * 3 and engine._slots == [None] * 3
    assert not engine._state.cache.ends.any()
