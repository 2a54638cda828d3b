"""The serving engine's decode step, eager or compiled (`DecodeStep`).

Compiled, the step is given inputs of the few kinds that `DecodeStep.warm_up` compiles
for, so that serving compiles nothing new; a graph compiled anyway is counted and logged
with dynamo's reason. `compile_for_serving` compiles a model's step for changing batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.fx.experimental import _config as fx_config

from ..errors import ShortVError

if TYPE_CHECKING:
    from ..models.batch import DecodeState, Encoded
    from ..session import VisionLanguageModel

log = logging.getLogger("shortv.serve")

WARM_UP_STEPS = 3  # decode steps per kind of batch in `DecodeStep.warm_up`


def compile_for_serving(model: VisionLanguageModel, **options: Any) -> VisionLanguageModel:
    """Compile the model's decode step for continuous batching: for dynamic shapes and
    without CUDA graphs (`mode="default"`), since the batch and the cache lengths change
    at every join and leave, and each new shape would need its own CUDA-graph recording
    over a static cache. `options` go to torch.compile. `Engine.compile` calls it; then
    `Engine.warm_up` compiles the graphs serving needs."""
    if options.get("backend", "inductor") == "inductor":  # modes are inductor's
        options.setdefault("mode", "default")
    return model.compile(static=False, **options)


class DecodeStep:
    """`model.step` as the engine runs it: eager until `compile`, then compiled for the
    kinds of batch `warm_up` covers. `compiles` counts the graphs compiled after warm-up."""

    def __init__(self, model: VisionLanguageModel) -> None:
        self.model = model
        self.compiled = False  # the decode step is compiled (`compile`)
        self.compiles = 0  # graphs compiled after warm-up
        self._warm = False  # `warm_up` has run
        self._graphs_seen = 0  # dynamo's count of compiled graphs after the last step
        self._failures_seen = 0  # and of the decode step's guard failures

    def compile(self, **options: Any) -> None:
        """Compile the model's decode step (`compile_for_serving`; `options` go to
        torch.compile). Then call `warm_up` before serving."""
        compile_for_serving(self.model, **options)
        self.compiled = True

    def warm_up(self, max_batch: int) -> float:
        """Compile the decode step for every kind of batch (of at most `max_batch` rows) the
        engine will hand it, before any client is answered; the seconds it took.

        The step keeps those kinds to two (see `__call__`): a batch of one, and a batch of
        several (dynamo specialises a dimension of size 1, and compiles the others for any
        size). A scripted run of the model's own calls covers both, whatever the model
        answers: one grey-picture prompt alone, then two more of other lengths prefilled
        together (padded) joining it, rows leaving, and the last one alone again. Each
        runs a few decode steps. From here on a compile is counted and logged as a warning."""
        started = time.perf_counter()
        graphs = _graphs_compiled()
        with torch.inference_mode():
            self._warm_up_batches(max_batch)
        self._warm = True
        self._graphs_seen = _graphs_compiled()
        self._failures_seen = len(_guard_failures(self.model))
        seconds = time.perf_counter() - started
        log.info("warm-up: compiled %d graph(s) of the decode step in %.1f s",
                 self._graphs_seen - graphs, seconds)
        return seconds

    def _warm_up_batches(self, max_batch: int) -> None:
        from PIL import Image

        picture = Image.new("RGB", (336, 336), (128, 128, 128))
        questions = ["Describe the picture in detail.", "Hi.",
                     "What colour is the picture? Answer in one word, please."]
        encoded = [self.model.encode(q, [picture]) for q in questions]
        steps = WARM_UP_STEPS

        def prefill(batch: list[Encoded]) -> tuple[Tensor, DecodeState]:
            logits, state = self.model.prefill(batch, max_new_tokens=4 * steps)
            if state.budget == 0:
                raise ShortVError("the warm-up prompts fill the model's context; serve without --compile")
            return logits.argmax(dim=-1), state

        def decode(state: DecodeState, tokens: Tensor) -> Tensor:
            for _ in range(steps):
                tokens = self(state, tokens).argmax(dim=-1)
            return tokens

        tokens, state = prefill(encoded[:1])
        tokens = decode(state, tokens)  # a batch of one
        if max_batch == 1:
            return
        new, joining = prefill(encoded[1:])  # two lengths: padded
        if max_batch >= 3:
            state, tokens = state.join(joining), torch.cat((tokens, new))
        else:
            state, tokens = joining, new
        tokens = decode(state, tokens)  # several
        if len(tokens) == 3:  # the middle one leaves
            state = state.select([0, 2])
            tokens = decode(state, tokens[[0, 2]])
        decode(state.select([0]), tokens[:1])  # one again, after the others left

    def __call__(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """`model.step`. A compiled step is given inputs of the kinds `warm_up` compiled
        for, so that serving compiles nothing new: dynamo guards on every Python value the
        step reads, so a batch of several always takes the masked-attention path (whether
        or not its rows happen to be padded: a mask of all True is the same attention), and
        a step whose cache must grow, or becomes exactly full, runs eagerly (each is a graph
        of its own; they happen a few times per answer, as the buffers double). Sizes that happen to be
        equal get no symbol of their own (no "duck shapes"): one graph then serves caches
        whose layers hold different lengths (FastV). Any graph compiled after warm-up is
        counted and logged with dynamo's reason."""
        if not self.compiled:
            return self.model.step(state, tokens)
        if len(tokens) > 1:
            for layer in state.cache.layers:
                layer.has_pad = True
        if _would_grow(state):
            with torch.compiler.set_stance("force_eager"):
                return self.model.step(state, tokens)
        with fx_config.patch(use_duck_shape=False):
            logits = self.model.step(state, tokens)
        if self._warm and (graphs := _graphs_compiled()) != self._graphs_seen:
            failures = _guard_failures(self.model)
            reason = _recompile_reason(failures[self._failures_seen:])
            self._graphs_seen, self._failures_seen = graphs, len(failures)
            self.compiles += 1
            log.warning("compiled a new graph after warm-up (%s)", reason)
        return logits


def _would_grow(state: DecodeState) -> bool:
    """Whether one more token overflows some layer's KV buffer (the step would grow it), or
    fills it exactly (inductor compiles a slice that is the whole buffer on its own)."""
    return any(layer.k is not None and layer.length + 1 >= layer.k.shape[2] for layer in state.cache.layers)


def _graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _guard_failures(model: VisionLanguageModel) -> list[str]:
    """Dynamo's record of the guards that failed on the decode step, one entry per cached
    graph checked before each compile."""
    return torch._dynamo.utils.guard_failures.get(type(model.module.decoder).step.__code__, [])


def _recompile_reason(failures: Sequence[str]) -> str:
    """Why dynamo compiled again: the first failed guard of each graph it had, without
    the source comment dynamo appends."""
    reasons = [str(f).strip().splitlines()[0].split("  #")[0].strip() for f in failures if str(f).strip()]
    return "; ".join(reasons)[:500] or "no guard failed: the first compile of this step"
