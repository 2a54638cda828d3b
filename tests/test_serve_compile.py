"""The serving engine with its decode step compiled (`Engine.compile`, `Engine.warm_up`):
after the warm-up, a stream of requests of every kind the engine meets compiles nothing
more, and a graph compiled anyway is logged with dynamo's reason.

A counting pass-through backend stands in for inductor: dynamo traces and guards the same
graphs, without the C++ compile."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import pytest
import torch

import shortv
from shortv.serve import Engine, Job
from shortv.serve.engine import Finished

from .data import PROMPTS, picture
from .engine_jobs import run_jobs

MODEL = "llava-tiny-demo"


@pytest.fixture(scope="module")
def fastv() -> shortv.LLaVA:
    """The demo with FastV: its layers hold caches of different lengths."""
    model = shortv.load(MODEL, device="cpu", dtype=torch.float32)
    model.set_method(shortv.FastV(k=2, r=0.5))
    return model


@pytest.fixture()
def graphs() -> Iterator[list[int]]:
    """The graphs the counting backend was given; dynamo starts from none (its caches and
    recompile limits are per code object, shared with every earlier test's models)."""
    torch._dynamo.reset()
    compiled: list[int] = []
    yield compiled
    torch._dynamo.reset()


def counting(compiled: list[int]):
    def backend(gm, example_inputs):
        compiled.append(len(example_inputs))
        return gm.forward

    return backend


def random_jobs(model: shortv.LLaVA, seed: int, n: int) -> list[tuple[Job, float]]:
    """Requests of every kind: with a picture or text only (FastV then drops nothing, and
    every layer holds the same length), prompts of many lengths, greedy and sampled, short
    and long answers (EOS banned: past the prefill's KV room, so the cache grows), arriving
    together or apart (joining a batch of any size, or alone)."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        with_image = rng.random() < 0.7
        question = PROMPTS[rng.randrange(4)] + " Please." * rng.randrange(6)
        text = model.template.render([(("<image>\n" if with_image else "") + question, None)])
        long_ = rng.random() < 0.3
        options = shortv.GenerationOptions(max_new_tokens=rng.choice([1, 2, 5, 12, 40]) if not long_ else 60,
                                           temperature=rng.choice([0.0, 0.0, 1.0]), seed=i)
        job = Job(f"r{i}", text, [picture(rng.randrange(16))] if with_image else [], options,
                  lambda event: None, logit_bias={model.tokenizer.eos_id: -100.0} if long_ else {})
        jobs.append((job, rng.choice([0.0, 0.0, 0.01, 0.05, 0.3])))
    return jobs


def test_a_random_stream_compiles_nothing_after_warm_up(fastv, graphs, caplog):
    engine = Engine(fastv, max_batch=4, max_prefill=2, stats_interval=0)
    engine.compile(backend=counting(graphs))
    engine.warm_up()
    warm = len(graphs)
    assert warm >= 1
    engine.start()
    caplog.set_level(logging.WARNING, logger="shortv.serve")
    try:
        events = run_jobs(engine, random_jobs(fastv, seed=1, n=24))
    finally:
        engine.stop()
    assert all(isinstance(e, Finished) for e in events.values()), events
    assert engine.stats.peak_batch == 4  # batches of every size met
    assert max(e.completion_tokens for e in events.values()) == 60  # past the prefill's KV room
    assert len(graphs) == warm and engine.stats.compiles == 0
    assert "compiled a new graph" not in caplog.text


def test_a_graph_compiled_after_warm_up_is_logged(fastv, graphs, caplog):
    """A compile the warm-up did not foresee (here: the final norm's epsilon changed, a
    constant of the step's graph; a method change no longer is one, since the decode step
    is the same for every method) is counted and logged with the failed guard."""
    engine = Engine(fastv, max_batch=2, stats_interval=0)
    engine.compile(backend=counting(graphs))
    engine.warm_up()
    warm = len(graphs)
    norm = fastv.module.decoder.norm
    eps = norm.eps
    norm.eps = eps * 2
    engine.start()
    caplog.set_level(logging.WARNING, logger="shortv.serve")
    try:
        jobs = random_jobs(fastv, seed=2, n=1)
        jobs[0][0].options = shortv.GenerationOptions(max_new_tokens=4)
        jobs[0][0].logit_bias = {fastv.tokenizer.eos_id: -100.0}
        run_jobs(engine, jobs)
    finally:
        engine.stop()
        norm.eps = eps
    assert len(graphs) == warm + 1 and engine.stats.compiles == 1
    (line,) = [r.getMessage() for r in caplog.records if "compiled a new graph" in r.getMessage()]
    assert line.startswith("compiled a new graph after warm-up (") and "eps" in line, line


def test_requests_under_other_methods_compile_nothing_more(fastv, graphs, caplog):
    """Requests naming FastV at another layer, VTW, VisionZip and vanilla beside the
    server's FastV, in one random stream: the decode step is shared, so nothing compiles
    after the warm-up, and every request is answered."""
    engine = Engine(fastv, max_batch=4, max_prefill=2, stats_interval=0)
    engine.compile(backend=counting(graphs))
    engine.warm_up()
    warm = len(graphs)
    entries = ["fastv k=3 r=0.25", "vtw k=4", "visionzip budget=12", "vanilla"]
    jobs = random_jobs(fastv, seed=3, n=16)
    for i, (job, _) in enumerate(jobs):
        if i % 5:
            job.method = engine.method_for(entries[i % len(entries)])
    engine.start()
    caplog.set_level(logging.WARNING, logger="shortv.serve")
    try:
        events = run_jobs(engine, jobs)
    finally:
        engine.stop()
    assert all(isinstance(e, Finished) for e in events.values()), events
    assert len(graphs) == warm and engine.stats.compiles == 0
    assert "compiled a new graph" not in caplog.text
