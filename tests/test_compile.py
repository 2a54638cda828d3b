"""The decode step is ready for torch.compile: one graph, no graph break, nothing read back
to the host, for every method; compiled generation gives the same tokens as eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo

import shortv

REPO = Path(shortv.__file__).resolve().parents[1]
IMAGE = REPO / "weights" / "llava-tiny-demo" / "example.png"
METHODS = [shortv.Vanilla(), shortv.ShortV((2, 5, 6, 7)), shortv.FastV(k=2, r=0.5), shortv.VTW(k=4)]
PROMPTS = ["What is in this picture?", "What colour is the circle on the left of the picture?"]


@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    return shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_decode_step_is_one_graph(demo, method):
    """A padded batch (two prompt lengths), after a prefill under the method."""
    demo.set_method(method)
    batch = [demo.encode(p, [IMAGE]) for p in PROMPTS]
    logits, state = demo.prefill(batch, max_new_tokens=4)
    with torch.inference_mode():
        explained = dynamo.explain(demo.module.decoder.step)(logits.argmax(-1), state.positions,
                                                             state.cache.view(2), demo.method)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("method", METHODS[1:3], ids=lambda m: m.name)
def test_compiled_generation_equals_eager(method):
    """`model.compile()` changes no token: ShortV (frozen layers) and FastV (per-layer
    cache lengths), a padded batch. The aot_eager backend traces the same graph without
    generating code, to keep the suite fast (the explain test above covers every method)."""
    model = shortv.load("llava-tiny-demo", device="cpu", method=method)
    images = [[IMAGE]] * len(PROMPTS)
    eager = [r.token_ids for r in model.generate(PROMPTS, images, max_new_tokens=8)]
    model.compile(backend="aot_eager")
    compiled = [r.token_ids for r in model.generate(PROMPTS, images, max_new_tokens=8)]
    assert compiled == eager and all(len(ids) > 2 for ids in eager)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_static_cache_decode_is_one_graph_for_every_step(method):
    """compile(static=True), the CUDA-graph form: every step has the same shapes, so the
    backend compiles once for the whole answer (with dynamic=False a shape that changed
    would compile again), and the tokens are eager's. A padded batch; FastV and VTW hold
    other lengths in the layers after their drop."""
    compiled: list[int] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        compiled.append(1)
        return graph.forward

    model = shortv.load("llava-tiny-demo", device="cpu", method=method)
    images = [[IMAGE]] * len(PROMPTS)
    eager = [r.token_ids for r in model.generate(PROMPTS, images, max_new_tokens=6, stop=["\x00"])]
    model.compile(static=True, backend=counting_backend)
    assert model.module._static_decode
    static = [r.token_ids for r in model.generate(PROMPTS, images, max_new_tokens=6, stop=["\x00"])]
    assert static == eager and max(len(ids) for ids in eager) >= 4
    assert len(compiled) == 1
