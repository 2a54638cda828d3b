"""The serving engine's decode step, eager or compiled (`DecodeStep`).

Compiled, the step runs on the engine's buckets of rows, which `DecodeStep.warm_up`
compiles for, so that serving compiles nothing new; a graph compiled anyway is counted and
logged with dynamo's reason. `compile_for_serving` compiles a model's step for serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.fx.experimental import _config as fx_config

from ..errors import ContextLengthError, ShortVError
from ..methods import VANILLA

if TYPE_CHECKING:
    from ..models.batch import DecodeState
    from ..session import VisionLanguageModel

log = logging.getLogger("shortv.serve")

WARM_UP_STEPS = 3  # decode steps per kind of batch in `DecodeStep.warm_up`


def compile_for_serving(model: VisionLanguageModel, **options: Any) -> VisionLanguageModel:
    """Compile the model's decode step for the engine's buckets of rows. On CUDA: CUDA
    graphs ("reduce-overhead") over the whole slot capacity (`static`), one graph per
    bucket. Elsewhere: dynamic shapes without graphs (`mode="default"`), each layer
    attending over the positions its rows hold; one graph for a single row and one for
    any other bucket. `options` go to torch.compile. `Engine.compile` calls it; then
    `Engine.warm_up` compiles the graphs serving needs."""
    static = model.device.type == "cuda"
    if options.get("backend", "inductor") == "inductor":  # modes are inductor's
        options.setdefault("mode", "reduce-overhead" if static else "default")
    return model.compile(static=static, **options)


class DecodeStep:
    """`model.step` as the engine runs it: eager until `compile`, then compiled for the
    buckets of rows `warm_up` covers. `compiles` counts the graphs compiled after warm-up."""

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

    def warm_up(self, state: DecodeState, buckets: Sequence[int]) -> float:
        """Compile the decode step for every bucket of rows the engine will run it on,
        before any client is answered; the seconds it took. A scripted run of the model's
        own calls on the engine's `state`, whatever the model answers: one grey-picture
        prompt in slot 0, a few steps on one row; two more prompts of other lengths
        (prefilled together, padded) in slots 1 and 2; a few steps on each bucket; then
        every slot is freed again. From here on a compile is counted and logged as a
        warning."""
        started = time.perf_counter()
        graphs = _graphs_compiled()
        with torch.inference_mode():
            self._warm_up_buckets(state, buckets)
        self._warm = True
        self._graphs_seen = _graphs_compiled()
        self._failures_seen = len(_guard_failures(self.model))
        seconds = time.perf_counter() - started
        log.info("warm-up: compiled %d graph(s) of the decode step in %.1f s",
                 self._graphs_seen - graphs, seconds)
        return seconds

    def _warm_up_buckets(self, state: DecodeState, buckets: Sequence[int]) -> None:
        from PIL import Image

        picture = Image.new("RGB", (336, 336), (128, 128, 128))
        questions = ["Describe the picture in detail.", "Hi.",
                     "What colour is the picture? Answer in one word, please."]
        encoded = [self.model.encode(q, [picture]) for q in questions]
        used = list(range(min(3, state.slots)))
        try:
            for first, group in ((0, encoded[:1]), (1, encoded[1:len(used)])):
                if not group:
                    continue
                slots = list(range(first, first + len(group)))
                logits, _ = self.model.prefill(group, max_new_tokens=4 * WARM_UP_STEPS,
                                               into=state, slots=slots)
                if logits.shape[1] == 0:
                    raise ShortVError("the warm-up prompts fill the model's context; serve without --compile")
                steps = WARM_UP_STEPS * (len(buckets) + 1)  # slot 0 takes part in every bucket
                if any(state.cache.room(slot) < steps for slot in slots):
                    raise ShortVError(f"the warm-up needs {steps} more positions after its prompts in "
                                      f"each slot; raise --max-context above {state.cache.capacity} or "
                                      "serve without --compile")
                for rows in buckets if first else buckets[:1]:
                    tokens = torch.zeros(rows, dtype=torch.long, device=self.model.device)
                    for _ in range(WARM_UP_STEPS):
                        tokens = self(state, tokens).argmax(dim=-1)
        except ContextLengthError as e:
            raise ShortVError(f"the warm-up prompts do not fit: {e}; raise --max-context or serve "
                              "without --compile") from e
        finally:
            state.free(used)

    def _step(self, state: DecodeState, tokens: Tensor) -> Tensor:
        # Vanilla's plan: a decode step is the same for every method (each layer attends
        # over what its slot holds), so requests prefilled under different methods share
        # it, and one graph serves them all.
        return self.model.module.step(state, tokens, VANILLA)

    def __call__(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """The decode step on the slots [0, len(tokens)). Sizes that happen to be equal get no
        symbol of their own (no "duck shapes"): one graph then serves layers whose windows
        differ (FastV) and windows equal to the number of rows. Any graph compiled after
        warm-up is counted and logged with dynamo's reason."""
        if not self.compiled:
            return self._step(state, tokens)
        with fx_config.patch(use_duck_shape=False):
            logits = self._step(state, tokens)
        if self._warm and (graphs := _graphs_compiled()) != self._graphs_seen:
            failures = _guard_failures(self.model)
            reason = _recompile_reason(failures[self._failures_seen:])
            self._graphs_seen, self._failures_seen = graphs, len(failures)
            self.compiles += 1
            log.warning("compiled a new graph after warm-up (%s)", reason)
        return logits


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
