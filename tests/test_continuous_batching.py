"""Continuous batching: a newly prefilled batch joins a running one between decode steps
(`DecodeState.join`) and finished sequences leave (`DecodeState.select`); every sequence
gets the greedy tokens it gets alone, for every method and on the static cache too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shortv

REPO = Path(shortv.__file__).resolve().parents[1]
IMAGE = REPO / "weights" / "llava-tiny-demo" / "example.png"
PROMPTS = [
    "What is in this picture?",
    "What colour is the circle on the left of the picture? Answer in one word.",
    "Describe the picture.",
]
METHODS = [shortv.Vanilla(), shortv.ShortV((2, 5, 6, 7)), shortv.FastV(k=2, r=0.5), shortv.VTW(k=4)]
NEW = 7


@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    return shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)


def greedy_alone(model: shortv.LLaVA, encoded: shortv.Encoded, n: int) -> list[torch.Tensor]:
    """The reference: one sequence, its own prefill, the logits [vocab] of n greedy steps."""
    logits, state = model.prefill([encoded], max_new_tokens=n)
    out = [logits[0]]
    for _ in range(n - 1):
        out.append(model.step(state, out[-1].argmax(-1)[None])[0])
    return out


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_join_and_leave_equal_alone(demo, method, static):
    """Sequence 0 runs 3 steps alone; then 1 and 2 (a padded batch) join it; each leaves
    when it has its tokens. Every step's logits equal the sequence's own, within 1e-4."""
    demo.set_method(method)
    demo.module._static_decode = static
    try:
        encoded = [demo.encode(p, [IMAGE]) for p in PROMPTS]
        alone = [greedy_alone(demo, e, NEW) for e in encoded]
        logits, state = demo.prefill(encoded[:1], max_new_tokens=NEW)
        got: list[list[torch.Tensor]] = [[logits[0]]]
        for _ in range(2):
            got[0].append(demo.step(state, got[0][-1].argmax(-1)[None])[0])
        logits, late = demo.prefill(encoded[1:], max_new_tokens=NEW)
        got += [[row] for row in logits]
        state = state.join(late)
        assert state.prompt_lengths == [len(demo.prepare([e]).types[0]) for e in encoded]
        rows = [0, 1, 2]
        while rows:
            last = torch.stack([got[r][-1].argmax(-1) for r in rows])
            for r, row in zip(rows, demo.step(state, last), strict=True):
                got[r].append(row)
            keep = [i for i, r in enumerate(rows) if len(got[r]) < NEW]
            if len(keep) < len(rows):  # finished sequences leave the batch
                rows = [rows[i] for i in keep]
                state = state.select(keep) if rows else state
        for mine, reference in zip(got, alone, strict=True):
            assert len(mine) == NEW
            torch.testing.assert_close(torch.stack(mine), torch.stack(reference), atol=1e-4, rtol=0)
    finally:
        demo.module._static_decode = False
        demo.set_method(shortv.Vanilla())


def test_select_drops_unused_leading_slots(demo):
    """The long sequence leaves; the short one's cache no longer carries its padding."""
    encoded = [demo.encode(p, [IMAGE]) for p in PROMPTS[:2]]
    _, state = demo.prefill(encoded, max_new_tokens=4)
    short, long_ = sorted(range(2), key=lambda i: state.prompt_lengths[i])
    kept = state.select([short])
    layer = kept.cache.layers[0]
    assert layer.length == state.prompt_lengths[short]
    assert bool(layer.valid[:, : layer.length].all()) and not layer.has_pad
    assert state.cache.layers[0].length == state.prompt_lengths[long_]
