"""Chunked prefill (`prefill_chunks`): a prompt fed to the decoder in pieces, each piece
attending to the KV cache of the pieces before it, gives the prefill of the whole prompt at
once, and the decode steps after it are the same. Oracle: the one-piece prefill (itself
checked against transformers in test_parity.py / test_qwen_vl.py), and greedy tokens
generated after it.
"""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

import shortv
from shortv import VTW, FastV, ShortV, compose
from shortv.methods import Vanilla

from .qwen_checkpoints import build_model, save_transformers
from .reference import random_rgb

TOL = dict(atol=1e-4, rtol=1e-4)
STEPS = 6


@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    return shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> shortv.QwenVL:
    root = tmp_path_factory.mktemp("qwen")
    save_transformers(build_model("qwen2_5_vl", root), root)
    model = shortv.load(str(root), device="cpu", dtype="float32")
    yield model
    shutil.rmtree(root, ignore_errors=True)


def batch_of(model: shortv.VisionLanguageModel) -> list[shortv.Encoded]:
    """Two prompts of different lengths (a left-padded batch), images of other sizes."""
    return [model.encode("What is in this picture? Describe it.", [random_rgb(90, 60, 1)]),
            model.encode("Why?", [random_rgb(120, 200, 2), random_rgb(60, 60, 3)])]


def run(model: shortv.VisionLanguageModel, batch: list[shortv.Encoded], chunk: int | None
        ) -> tuple[list[torch.Tensor], int]:
    """Next-token logits after the prefill and after each of STEPS greedy steps, and how
    many pieces the prefill took."""
    results = list(model.prefill_chunks(batch, max_new_tokens=STEPS + 1, chunk=chunk))
    assert all(r is None for r in results[:-1]) and results[-1] is not None
    logits, state = results[-1]
    out = [logits]
    for _ in range(STEPS):
        out.append(model.step(state, out[-1].argmax(-1)))
    return out, len(results)


METHODS = {"vanilla": Vanilla(), "shortv": ShortV((1, 2, 4)), "fastv": FastV(k=2, r=0.5),
           "vtw": VTW(k=3), "shortv+fastv": compose(ShortV((4,)), FastV(k=2, r=0.5))}


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("name", METHODS)
def test_chunked_prefill_equals_one_piece(demo, name: str, chunk: int):
    """On a padded batch; chunks of 5 / 16 hold the image's 36 visual tokens alone, which a
    ShortV layer freezes entirely (their keys and values must still be cached)."""
    demo.set_method(METHODS[name])
    try:
        batch = batch_of(demo)
        whole, one = run(demo, batch, None)
        pieced, pieces = run(demo, batch, chunk)
    finally:
        demo.set_method(Vanilla())
    t = demo.prepare(batch).types.shape[1]
    drops = shortv.methods.Hook.TOKENS in METHODS[name].hooks
    assert one == 1 and pieces == (1 if drops else -(-t // chunk))
    for a, b in zip(pieced, whole, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert [x.argmax(-1).tolist() for x in pieced] == [x.argmax(-1).tolist() for x in whole]


@pytest.mark.parametrize("chunk", [3, 40])
def test_chunked_prefill_on_mrope(qwen, chunk: int):
    """Qwen2.5-VL: each piece carries its slice of the 3-D positions."""
    batch = batch_of(qwen)
    whole, _ = run(qwen, batch, None)
    pieced, pieces = run(qwen, batch, chunk)
    assert pieces > 1
    for a, b in zip(pieced, whole, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_bad_chunk_size(demo):
    with pytest.raises(ValueError, match="chunk"):
        next(demo.prefill_chunks(batch_of(demo), max_new_tokens=2, chunk=0))


def test_the_generator_leaves_no_inference_mode_behind(demo):
    """Between pieces the caller's thread is back in its own grad mode."""
    pieces = demo.prefill_chunks(batch_of(demo), max_new_tokens=2, chunk=8)
    assert next(pieces) is None
    assert not torch.is_inference_mode_enabled()
    for _ in pieces:
        pass


# ---- the server's engine: a long prompt in pieces between decode steps ------------------------


def test_engine_prefills_a_long_prompt_between_decode_steps(demo):
    """Jobs A and B (prompts of ~80 positions, prefilled one group each) arrive together;
    with pieces of 8 the engine prefills A first, one piece per loop, then A decodes (EOS
    banned, so it runs its 16 tokens) while B's remaining pieces go through, one between
    every two decode steps. Both answers are their own: B's is `model.chat`'s."""
    import threading

    from shortv.serve import Engine, Job
    from shortv.serve.engine import Failed, Finished

    image = random_rgb(80, 60, 7)
    engine = Engine(demo, max_batch=4, max_prefill=1, prefill_chunk=8, stats_interval=0)
    events: list[tuple[str, object, int]] = []
    done = threading.Semaphore(0)

    def sink(name: str):
        def put(event) -> None:  # the engine's thread, in order
            events.append((name, event, engine.stats.steps))
            if isinstance(event, Finished | Failed):
                done.release()
        return put

    def job(name: str, prompt: str, **options) -> Job:
        text = demo.template.render([("<image>\n" + prompt, None)])
        return Job(name, text, [image], shortv.GenerationOptions(max_new_tokens=16), sink(name), **options)

    b_prompt = "Describe the picture in detail, every shape and every colour."
    real = demo.prefill_chunks
    piece_steps: list[int] = []  # decode steps run so far, at each of B's pieces

    def traced(batch, **kwargs):
        for result in real(batch, **kwargs):
            if any(b_prompt in e.prompt for e in batch):
                piece_steps.append(engine.stats.steps)
            yield result

    demo.prefill_chunks = traced  # type: ignore[method-assign]
    try:
        engine.submit(job("a", "What is in this picture?", logit_bias={demo.tokenizer.eos_id: -100.0}))
        engine.submit(job("b", b_prompt))
        engine.start()  # both are admitted in its first loop: no timing involved
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        engine.stop()
        del demo.prefill_chunks
    by_name = {name: [e for n, e, _ in events if n == name] for name in ("a", "b")}
    assert isinstance(by_name["a"][-1], Finished) and by_name["a"][-1].completion_tokens == 16
    assert by_name["b"][-1].text == demo.chat(b_prompt, [image], max_new_tokens=16)
    b_length = by_name["b"][0].prompt_tokens
    assert b_length > 8 * 4  # several pieces
    # B went through in pieces of 8: its first at admission, the rest once A (the older
    # group) was prefilled and decoding, a decode step between every two of them.
    assert len(piece_steps) == -(-b_length // 8) >= 6
    assert piece_steps[0] == 0
    assert all(later > earlier for earlier, later in itertools.pairwise(piece_steps[1:]))


def test_a_client_gone_while_its_prompt_is_prefilled_frees_its_slot_at_once(demo):
    """Job A's client goes away after A's first piece: its prefill stops (no more pieces,
    no first token, counted as cancelled) and B, behind it, is answered as alone."""
    import threading

    from shortv.serve import Engine, Job
    from shortv.serve.engine import Failed, Finished

    image = random_rgb(80, 60, 8)
    engine = Engine(demo, max_batch=4, max_prefill=1, prefill_chunk=8, stats_interval=0)
    events: dict[str, list] = {"a": [], "b": []}
    done = threading.Semaphore(0)
    real = demo.prefill_chunks
    a_pieces = []

    def traced(batch, **kwargs):
        for result in real(batch, **kwargs):
            if any("first" in e.prompt for e in batch):
                a_pieces.append(1)
                engine.cancel(jobs["a"])  # on the engine's thread, between two pieces
            yield result

    def job(name: str, prompt: str) -> Job:
        def sink(event) -> None:
            events[name].append(event)
            if isinstance(event, Finished | Failed):
                done.release()
        text = demo.template.render([("<image>\n" + prompt, None)])
        return Job(name, text, [image], shortv.GenerationOptions(max_new_tokens=8), sink)

    jobs = {"a": job("a", "The first question: what is in this picture?"), "b": job("b", "Describe it.")}
    demo.prefill_chunks = traced  # type: ignore[method-assign]
    try:
        engine.submit(jobs["a"])
        engine.submit(jobs["b"])
        engine.start()
        assert done.acquire(timeout=60)
    finally:
        engine.stop()
        del demo.prefill_chunks
    assert a_pieces == [1] and events["a"] == [] and engine.stats.cancelled == 1
    assert events["b"][-1].text == demo.chat("Describe it.", [image], max_new_tokens=8)
