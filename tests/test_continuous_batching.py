"""Continuous batching on a slot cache: prompts are prefilled into free slots of a running
`DecodeState` between decode steps (`prefill(..., into=, slots=)`) and finished sequences
free theirs (`DecodeState.free`); every sequence gets the greedy tokens it gets alone, for
every method and with static windows too, and no other slot is ever copied."""

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
    """Sequence 0 runs 2 steps alone in slot 1 of a 4-slot state (slot 0 free: its row
    computes a token nobody reads); then 1 and 2 (a padded batch) are prefilled into slots 0
    and 3; each frees its slot when it has its tokens. Every step's logits equal the
    sequence's own, within 1e-4."""
    demo.set_method(method)
    demo.module._static_decode = static
    try:
        encoded = [demo.encode(p, [IMAGE]) for p in PROMPTS]
        alone = [greedy_alone(demo, e, NEW) for e in encoded]
        state = demo.decode_state(4, 700)
        slot_of = {0: 1, 1: 0, 2: 3}
        logits, same = demo.prefill(encoded[:1], max_new_tokens=NEW, into=state, slots=[1])
        assert same is state
        got: list[list[torch.Tensor]] = [[logits[0]]]
        for _ in range(2):
            tokens = torch.tensor([0, int(got[0][-1].argmax())])
            got[0].append(demo.step(state, tokens)[1])
        logits, _ = demo.prefill(encoded[1:], max_new_tokens=NEW, into=state, slots=[0, 3])
        got += [[row] for row in logits]
        assert [state.prompt_lengths[slot_of[i]] for i in range(3)] == \
            [len(demo.prepare([e]).types[0]) for e in encoded]
        rows = [0, 1, 2]
        while rows:
            width = state.rows_needed()
            tokens = torch.zeros(width, dtype=torch.long)
            for r in rows:
                tokens[slot_of[r]] = got[r][-1].argmax()
            out = demo.step(state, tokens)
            for r in rows:
                got[r].append(out[slot_of[r]])
            done = [r for r in rows if len(got[r]) == NEW]
            state.free([slot_of[r] for r in done])  # finished sequences leave
            rows = [r for r in rows if r not in done]
        for mine, reference in zip(got, alone, strict=True):
            assert len(mine) == NEW
            torch.testing.assert_close(torch.stack(mine), torch.stack(reference), atol=1e-4, rtol=0)
    finally:
        demo.module._static_decode = False
        demo.set_method(shortv.Vanilla())


def test_joining_and_leaving_copy_no_other_slot(demo):
    """A prefill into slot 2 and freeing slot 0 leave every other slot's keys and values
    exactly as they were, in the same buffers (no reallocation, no copy)."""
    encoded = [demo.encode(p, [IMAGE]) for p in PROMPTS]
    state = demo.decode_state(3, 700)
    demo.prefill(encoded[:2], max_new_tokens=4, into=state, slots=[0, 1])
    cache = state.cache
    buffers = [t.data_ptr() for t in (*cache.k, *cache.v)]
    slot1 = [(k[1].clone(), v[1].clone()) for k, v in zip(cache.k, cache.v, strict=True)]
    demo.prefill(encoded[2:], max_new_tokens=4, into=state, slots=[2])
    state.free([0])
    assert [t.data_ptr() for t in (*cache.k, *cache.v)] == buffers
    for (k, v), (k1, v1) in zip(zip(cache.k, cache.v, strict=True), slot1, strict=True):
        assert torch.equal(k[1], k1) and torch.equal(v[1], v1)
    assert cache.live == [False, True, True] and state.rows_needed() == 3
    assert state.prompt_lengths[0] == 0


def test_slots_hold_prompts_without_padding(demo):
    """A padded prefill: each slot holds exactly its own prompt's positions (FastV: fewer
    from its drop layer on), so the short prompt's decode attends over no padding."""
    encoded = [demo.encode(p, [IMAGE]) for p in PROMPTS[:2]]
    _, state = demo.prefill(encoded, max_new_tokens=4)
    assert [state.cache.held(s) for s in range(2)] == state.prompt_lengths
    demo.set_method(shortv.FastV(k=2, r=0.5))
    try:
        _, state = demo.prefill(encoded, max_new_tokens=4)
    finally:
        demo.set_method(shortv.Vanilla())
    visual = int((demo.token_types(encoded[0]) == int(shortv.TokenType.VISUAL)).sum())
    assert visual > 0
    for s, n in enumerate(state.prompt_lengths):
        assert state.cache.ends[:2, s].tolist() == [n, n]
        assert state.cache.ends[2:, s].tolist() == [n - visual // 2] * 6


def test_cache_bytes_equal_the_plan(demo):
    state = demo.decode_state(5, 300)
    c = demo.config.text
    expected = 2 * c.layers * 5 * c.kv_heads * 300 * c.head_dim * 4
    assert state.cache.nbytes == state.cache.plan.nbytes == expected
    assert "5 slots x 300 positions" in state.cache.plan.describe()


def test_a_prompt_that_cannot_fit_its_slot_is_refused(demo):
    state = demo.decode_state(2, 50)
    with pytest.raises(shortv.ShortVError, match="at most 50"):
        demo.prefill([demo.encode(PROMPTS[0], [IMAGE])], max_new_tokens=4, into=state, slots=[0])
    assert state.cache.live == [False, False]


def test_write_keeps_exactly_each_rows_valid_keys():
    """`SlotCache.write` on a hand-made prefill cache: left padding, a full row, a row whose
    valid positions are not one run, and an empty row; each slot holds exactly its row's
    valid keys and values, in order (against boolean indexing, written out here)."""
    from shortv.models.kv_cache import CachePlan, KVCache, SlotCache

    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]],
                         dtype=torch.bool)
    k, v = torch.randn(4, 2, 5, 3, generator=g), torch.randn(4, 2, 5, 3, generator=g)
    prefill = KVCache(1)
    prefill.layers[0].append(k, v, valid, True)
    cache = SlotCache(CachePlan(1, 6, 8, 2, 3, torch.float32), "cpu")
    slots = [5, 0, 2, 3]
    cache.write(slots, prefill)
    for row, slot in enumerate(slots):
        n = int(valid[row].sum())
        assert int(cache.ends[0, slot]) == n
        torch.testing.assert_close(cache.k[0][slot, :, :n], k[row][:, valid[row]], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[0][slot, :, :n], v[row][:, valid[row]], rtol=0, atol=0)
    assert cache.live == [True, False, True, True, False, True]
