"""The batching engine: one model, one worker thread, continuous batching.

Requests (`Job`s) wait in a bounded queue. The engine owns one `DecodeState` for its whole
life: a `SlotCache` of `max_batch` slots of `max_context` positions, allocated at start
(its size is the plan `kv_plan` describes). Between two decode steps the worker admits as
many waiting jobs as there are free slots: they are encoded and prefilled in groups of up
to `max_prefill` (`VisionLanguageModel.prefill_chunks`), each into a free slot, and each
one's first token is picked. A long prompt is prefilled in pieces of `prefill_chunk`
positions, one piece per decode step of the running batch, so that the answers already
streaming keep their pace while it arrives.
Then one `VisionLanguageModel.step` advances the slots [0, B) by a token, B the smallest
bucket (1, 2, 4, 8, ..., max_batch) that covers every running slot; each running slot's
token is picked with its own request's options and generator, and its text is assembled
with `shortv.generate.loop.Answer`, as `model.chat` does. A sequence that ends (EOS, a stop
string, its own budget) or whose client went away frees its slot (`DecodeState.free`).
Nothing is copied when sequences join or leave, and a compiled step sees one shape per
bucket.

The worker is the only thread that touches the model, and so the model's vision-feature
cache (`VisionLanguageModel.cache_features`, which `shortv serve` turns on): an image sent
again skips the vision tower at prefill. It talks to the requests' owners
through each job's `sink`, a callable that receives `Started`, `Delta`, `Finished` or
`Failed` events (the HTTP app forwards them to its event loop).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import ContextLengthError, ShortVError
from ..generate.loop import Answer
from ..generate.sampling import GenerationOptions, make_generator, pick
from ..ranking import entry_method
from ..zoo import card
from .compiled import DecodeStep
from .errors import EngineError, Refusal

if TYPE_CHECKING:
    from ..methods import Method
    from ..models.batch import DecodeState, Encoded
    from ..models.feature_cache import FeatureCache
    from ..models.kv_cache import CachePlan
    from ..session import VisionLanguageModel

log = logging.getLogger("shortv.serve")


@dataclass(frozen=True)
class Started:
    """The prompt was prefilled: its length in tokens after image expansion."""

    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    """More answer text (pieces join to the final text, as `model.chat(stream=True)`)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The answer: its text, why it ended ("eos", "stop", "length") and its token counts
    (generated ids, EOS excluded)."""

    text: str
    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed (nothing more follows): what went wrong, by kind (`Refusal`)."""

    error: EngineError


Event = Started | Delta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One request in the engine. `options.max_new_tokens` is its max_tokens; with
    `strict_budget` a max_tokens that does not fit the context after the prompt fails the
    request instead of being shortened. `logit_bias` (OpenAI's) is added to its logits
    before each of its tokens is picked."""

    id: str
    prompt: str  # the conversation as the model's template renders it, <image> in place
    images: Sequence[Any]  # PIL images, one per <image>
    options: GenerationOptions
    sink: Callable[[Event], None]
    strict_budget: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    method: Method | None = None  # its prefill's method (`Engine.method_for`); None: the model's
    cancelled: bool = False  # set by the owner (any thread); the worker drops the job
    # Worker-side state.
    done: bool = False
    answer: Answer | None = None
    generator: torch.Generator | None = None
    remaining: int = 0
    slot: int = -1  # its slot in the engine's KV cache, from admission until it ends
    last_token: int = 0
    prompt_tokens: int = 0
    submitted_at: float = 0.0  # when `submit` took it (time.monotonic)
    last_token_at: float = 0.0  # when its latest token was picked (0: none yet)
    bias_ids: Tensor | None = None  # `logit_bias` as token ids (long) and values (float) on the
    bias_values: Tensor | None = None  # model's device, set by `_encode` when there is any


# Upper bounds (seconds) of the latency histograms' buckets (and +Inf).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """A Prometheus histogram: observations counted in cumulative `LATENCY_BUCKETS`."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations at most le) per bucket, "+Inf" last."""
        bounds = [f"{b:g}" for b in LATENCY_BUCKETS] + ["+Inf"]
        return list(zip(bounds, itertools.accumulate(self.counts), strict=True))


@dataclass
class Stats:
    """Counters for /metrics and the stats line (written by the worker; `queue` and
    `cancelled` also by `submit` / `cancel`, under the engine's lock)."""

    queue: int = 0  # jobs waiting
    batch: int = 0  # sequences in the running batch
    peak_batch: int = 0
    steps: int = 0
    step_rows: int = 0  # sum of batch sizes over steps (mean batch = step_rows / steps)
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compiles: int = 0  # graphs of the compiled decode step compiled after warm-up
    ttft: Histogram = field(default_factory=Histogram)  # submission to first token
    inter_token: Histogram = field(default_factory=Histogram)  # between a request's tokens
    started_at: float = field(default_factory=time.time)


@dataclass
class _Prefill:
    """A group of jobs being prefilled together: their prompts, their slots and the pieces
    left (`VisionLanguageModel.prefill_chunks`)."""

    jobs: list[Job]
    encoded: list[Encoded]
    slots: list[int]
    pieces: Iterator[tuple[Tensor, DecodeState] | None] | None = None  # set by the first piece


class Engine:
    """Continuous batching of chat requests on one model (see the module docstring).

    max_batch: sequences decoded together (prefilling ones included): the KV cache's slots.
    max_context: positions each slot holds, prompt and answer (None: the model's context);
    a request that cannot fit is refused (`Refusal.TOO_LONG`), and an answer that reaches
    it ends with "length". max_queue: requests waiting for a slot; `submit` refuses more
    (`Refusal.OVERLOADED`). max_prefill: new requests prefilled together in one padded
    batch (1: each alone, exactly `model.chat`'s prefill). prefill_chunk: positions of a
    prompt the decoder takes between two decode steps (None: a whole prompt at once).
    stats_interval: seconds between stats log lines while busy (0: none)."""

    def __init__(self, model: VisionLanguageModel, *, max_batch: int = 16, max_queue: int = 64,
                 max_prefill: int = 8, prefill_chunk: int | None = 2048, max_context: int | None = None,
                 stats_interval: float = 10.0) -> None:
        if max_batch < 1 or max_queue < 0 or max_prefill < 1:
            raise ValueError("max_batch and max_prefill must be >= 1, max_queue >= 0")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1 or None")
        context = model.config.text.max_position_embeddings
        if max_context is not None and not 2 <= max_context <= context:
            raise ValueError(f"max_context must lie in [2, {context}] (the model's context)")
        self.model = model
        self.max_batch = max_batch
        self.max_prefill = max_prefill
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.stats_interval = stats_interval
        self.stats = Stats()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []  # decoding, each in its slot (worker only)
        self._prefilling: deque[_Prefill] = deque()  # groups with pieces left (worker only)
        self._slots: list[Job | None] = [None] * max_batch  # who holds each slot (worker only)
        self._state = model.decode_state(max_batch, context if max_context is None else max_context)
        self.buckets = _buckets(max_batch)
        self._draining = False
        self._deadline: float | None = None  # when draining: cancel what is left then
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._last_stats = 0.0
        self._decode = DecodeStep(model)  # `model.step`, eager or compiled
        self._methods: dict[str, Method] = {}  # `method_for`'s memo

    def method_for(self, entry: str) -> Method:
        """The method a request names (its "method" field: a method entry such as
        "fastv k=2 r=0.5", "visionzip budget=64" or "shortv", ShortV taking the zoo card's
        paper N), fitted to the model; EngineError (BAD_INPUT) when it cannot be used.
        Requests under different methods are prefilled apart and decoded together."""
        if entry not in self._methods:
            try:
                chosen = entry_method(entry.strip(), card(self.model.name), self.model.num_layers)
                self._methods[entry] = self.model.check_method(chosen)
            except ShortVError as e:
                raise EngineError(Refusal.BAD_INPUT, f"method {entry.strip()!r}: {e}",
                                  param="method") from None
            if len(self._methods) > 256:  # a bounded memo: clients may send any text
                self._methods.pop(next(iter(self._methods)))
        return self._methods[entry]

    @property
    def kv_plan(self) -> CachePlan:
        """The KV cache's shape and bytes (allocated when the engine was made)."""
        return self._state.cache.plan

    # ---- the owners' side (any thread) -----------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shortv-engine", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; EngineError when the queue is full (OVERLOADED) or the engine is
        shutting down (SHUTTING_DOWN)."""
        with self._cond:
            if self._draining or self._stopped:
                raise shutting_down()
            if len(self._waiting) >= self.max_queue:
                raise EngineError(Refusal.OVERLOADED, f"the server is busy: {len(self._waiting)} requests "
                                                      "are waiting (--max-queue); retry later")
            job.submitted_at = time.monotonic()
            self._waiting.append(job)
            self.stats.queue = len(self._waiting)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): it leaves the queue or the batch."""
        job.cancelled = True
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.stats.queue = len(self._waiting)
                self.stats.cancelled += 1
                job.done = True
            self._cond.notify()

    def compile(self, **options: Any) -> None:
        """Compile the model's decode step for serving (`compile_for_serving`; `options` go
        to torch.compile). Then call `warm_up` before serving."""
        self._decode.compile(**options)

    @property
    def compiled(self) -> bool:
        """Whether the decode step is compiled (`compile`)."""
        return self._decode.compiled

    def warm_up(self) -> float:
        """Compile the decode step for every kind of batch the engine will hand it, before
        any client is answered (`DecodeStep.warm_up`); the seconds it took. Nothing reaches
        the stats or the queue; the worker is not started. From here on a compile during
        serving is logged as a warning and counted in `stats.compiles`."""
        return self._decode.warm_up(self._state, self.buckets)

    def drain(self, timeout: float) -> None:
        """Begin a graceful shutdown: refuse new jobs; those queued or running may finish
        within `timeout` seconds, after which they fail as shutting down."""
        with self._cond:
            self._draining = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify()

    @property
    def feature_cache(self) -> FeatureCache | None:
        """The model's vision-feature cache (`VisionLanguageModel.cache_features`), if on.
        Only the worker uses it; its counters may be read from any thread."""
        return self.model.feature_cache

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail whatever is left (shutting down) and end the worker thread."""
        with self._cond:
            self._draining = self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        # Every tensor the worker makes (the step's tokens, the cache's views) is an
        # inference tensor, like those `prefill` and `step` make: a compiled step guards on
        # whether each input is one, so a mix would compile a new graph per combination.
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._prefilling or self._stopped
                           or self._past_deadline()):
                    self._cond.wait(self._wait_seconds())
                if self._stopped or self._past_deadline():
                    break
                new = []
                while self._waiting and self._occupied() + len(new) < self.max_batch:
                    new.append(self._waiting.popleft())
                self.stats.queue = len(self._waiting)
            try:
                self._admit(new)
                self._leave()
                if self._running:
                    self._step()
                    self._leave()
                self._continue_prefill()
            except Exception as e:  # a bug in the engine itself: fail the batch, keep serving
                log.exception("the engine failed; failing the %d requests in the batch", len(self._running))
                for job in [*new, *self._running, *self._prefilling_jobs()]:
                    if not job.done:
                        self._fail(job, _as_engine_error(e, job))
                self._clear()
            self._log_stats()
        with self._cond:
            left = [*self._waiting, *self._running, *self._prefilling_jobs()]
            self._waiting.clear()
        for job in left:
            if not job.done:
                self._fail(job, shutting_down("the request was cancelled"))
        self._clear()
        self.stats.queue = 0

    def _clear(self) -> None:
        """Empty the batch: every slot free, nothing running or prefilling."""
        self._running = []
        self._prefilling.clear()
        self._release([s for s, job in enumerate(self._slots) if job is not None])
        self.stats.batch = 0

    def _occupied(self) -> int:
        """Slots taken: by running sequences and by those still being prefilled."""
        return sum(job is not None for job in self._slots)

    def _release(self, slots: Sequence[int]) -> None:
        """Free slots whose sequences ended (or never started)."""
        self._state.free(slots)
        for slot in slots:
            self._slots[slot] = None

    def _prefilling_jobs(self) -> list[Job]:
        return [job for group in self._prefilling for job in group.jobs]

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _wait_seconds(self) -> float | None:
        if self._deadline is not None:
            return max(0.0, self._deadline - time.monotonic())
        return None

    def _admit(self, jobs: Sequence[Job]) -> None:
        """Prefill the new jobs (up to `max_prefill` in one padded batch), each into a free
        slot, and pick their first tokens."""
        live = []
        for job in jobs:
            if job.cancelled:
                self._count_cancelled(job)
            elif (encoded := self._encode(job)) is not None:
                live.append((job, encoded))
        by_method: dict[Method, list[tuple[Job, Encoded]]] = {}
        for job, encoded in live:  # one method per prefill, the jobs in arrival order
            by_method.setdefault(job.method or self.model.method, []).append((job, encoded))
        for jobs_encoded in by_method.values():
            for at in range(0, len(jobs_encoded), self.max_prefill):
                group = jobs_encoded[at: at + self.max_prefill]
                self._begin_prefill([job for job, _ in group], [e for _, e in group])
        self._count_batch()

    def _count_batch(self) -> None:
        self.stats.batch = len(self._running)
        self.stats.peak_batch = max(self.stats.peak_batch, self.stats.batch)

    def _encode(self, job: Job) -> Encoded | None:
        try:
            vocab = self.model.config.text.vocab_size
            if (outside := [t for t in job.logit_bias if t >= vocab]):
                raise EngineError(Refusal.BAD_INPUT, f"logit_bias has token id {outside[0]}, but this "
                                  f"model's vocabulary has {vocab} tokens (ids 0 to {vocab - 1})",
                                  param="logit_bias")
            if job.logit_bias:
                device = self.model.device
                job.bias_ids = torch.tensor(list(job.logit_bias), dtype=torch.long, device=device)
                job.bias_values = torch.tensor(list(job.logit_bias.values()), dtype=torch.float32,
                                               device=device)
            encoded = self.model.encode(job.prompt, list(job.images), template=False)
        except Exception as e:
            self._fail(job, _as_engine_error(e, job))
            return None
        job.images = ()  # the pixels are in `encoded` now
        return encoded

    def _begin_prefill(self, jobs: list[Job], encoded: list[Encoded]) -> None:
        """Give each job of a group a free slot and start prefilling the group with its
        first piece; when that was the whole prompt the group starts decoding (see
        `_advance`), otherwise it waits in `_prefilling` for its next piece."""
        free = [s for s, holder in enumerate(self._slots) if holder is None][: len(jobs)]
        for job, slot in zip(jobs, free, strict=True):
            job.slot, self._slots[slot] = slot, job
        group = _Prefill(jobs, encoded, free)
        self._prefilling.append(group)
        self._advance(group)

    def _continue_prefill(self) -> None:
        """The next piece of the oldest group still being prefilled."""
        if self._prefilling:
            self._advance(self._prefilling[0])
            self._count_batch()

    def _advance(self, group: _Prefill) -> None:
        """Run `group`'s next piece; when the prefill is complete (or failed), the group
        leaves `_prefilling` and `_started` takes it over. A group whose prefill fails, or
        in which one prompt fills the context, is prefilled again one job at a time, so that
        only the job at fault fails. A group whose clients all went away stops here."""
        if all(job.cancelled for job in group.jobs):
            self._prefilling.remove(group)
            self._release(group.slots)
            for job in group.jobs:
                self._count_cancelled(job)
            return
        try:
            if group.pieces is None:
                group.pieces = self.model.prefill_chunks(
                    group.encoded, max_new_tokens=max(job.options.max_new_tokens for job in group.jobs),
                    chunk=self.prefill_chunk, into=self._state, slots=group.slots,
                    method=group.jobs[0].method)
            result = next(group.pieces)
            if result is not None and result[0].shape[1] == 0 and len(group.jobs) > 1:
                raise ContextLengthError("a prompt fills the context")
        except Exception as e:
            self._prefilling.remove(group)
            self._release(group.slots)
            if len(group.jobs) > 1:
                for job, e1 in zip(group.jobs, group.encoded, strict=True):
                    self._begin_prefill([job], [e1])
            else:
                self._fail(group.jobs[0], _as_engine_error(e, group.jobs[0]))
            return
        if result is not None:
            self._prefilling.remove(group)
            self._started(group.jobs, result[0])

    def _started(self, jobs: list[Job], logits: Tensor) -> None:
        """A prefilled group (row i of `logits` is jobs[i]'s): accept each job's first
        token; those still going join `_running`, the others free their slots."""
        for job in jobs:
            try:
                n = job.prompt_tokens = self._state.prompt_lengths[job.slot]
                job.remaining = self._budget(job)
                job.answer = Answer.start(self.model, job.options)
                job.generator = make_generator(job.options.seed, self.model.device)
                job.sink(Started(n))
                self.stats.prompt_tokens += n
            except Exception as e:
                self._fail(job, _as_engine_error(e, job))
        rows = [i for i, job in enumerate(jobs) if not job.done]
        for i, token in zip(rows, _pick(logits[rows], [jobs[i] for i in rows]), strict=True):
            try:
                if token is None:
                    raise RuntimeError("sampling failed")
                self._accept(jobs[i], token)
            except Exception as e:
                self._fail(jobs[i], _as_engine_error(e, jobs[i]))
        self._running += [job for job in jobs if not job.done]
        self._release([job.slot for job in jobs if job.done])

    def _budget(self, job: Job) -> int:
        """How many tokens the job may generate: its max_tokens, or less where the context
        or its slot ends (EngineError TOO_LONG when nothing fits, or when an explicit
        max_tokens does not)."""
        n = job.prompt_tokens
        context = self.model.config.text.max_position_embeddings
        if n >= context:
            raise EngineError(Refusal.TOO_LONG, f"the prompt has {n} tokens after expanding its images, "
                                                f"which fills the model's context of {context} tokens; "
                                                "shorten the messages or send fewer images", param="messages")
        room = self._state.cache.room(job.slot)
        fits = min(context - n, room)
        wanted = job.options.max_new_tokens
        if job.strict_budget and wanted > fits:
            capacity = self._state.cache.capacity
            limit = (f"{n + wanted} is more than the model's context of {context} tokens"
                     if room >= context - n else
                     f"{n + wanted} is more than the {capacity} positions this server holds per "
                     "request (--max-context)")
            raise EngineError(Refusal.TOO_LONG, f"the prompt has {n} tokens after expanding its images "
                                                f"and max_tokens is {wanted}: {limit}; ask for at most "
                                                f"{fits}", param="max_tokens")
        return min(wanted, fits)

    def _step(self) -> None:
        """One decode step for the slots [0, B): B the smallest bucket covering every
        running slot (the other rows compute tokens nobody reads)."""
        jobs = self._running
        rows = next(b for b in self.buckets if b > max(job.slot for job in jobs))
        tokens = [0] * rows
        for job in jobs:
            tokens[job.slot] = job.last_token
        try:
            logits = self._decode(self._state, torch.tensor(tokens, device=self.model.device))
        except Exception as e:  # the step is shared: every running request fails with it
            log.exception("a decode step failed; failing the %d requests in the batch", len(jobs))
            for job in jobs:
                self._fail(job, _as_engine_error(e, job))
            self._release([job.slot for job in jobs])
            self._running = []
            return
        self.stats.steps += 1
        self.stats.step_rows += len(jobs)
        self.stats.compiles = self._decode.compiles  # the step counts its own
        index = torch.tensor([job.slot for job in jobs], device=logits.device)
        for job, token in zip(jobs, _pick(logits.index_select(0, index), jobs), strict=True):
            try:
                if token is None:
                    raise RuntimeError("sampling failed")
                self._accept(job, token)
            except Exception as e:
                self._fail(job, _as_engine_error(e, job))

    def _accept(self, job: Job, token: int) -> None:
        """A job's next token: more text, or the end of its answer."""
        assert job.answer is not None
        now = time.monotonic()
        if job.last_token_at:
            self.stats.inter_token.observe(now - job.last_token_at)
        else:
            self.stats.ttft.observe(now - job.submitted_at)
        job.last_token_at = now
        job.answer.add(token)
        job.last_token = token
        job.remaining -= 1
        if job.answer.done or job.remaining <= 0:
            self._finish(job)
        elif piece := job.answer.release():
            job.sink(Delta(piece))

    def _finish(self, job: Job) -> None:
        assert job.answer is not None
        if piece := job.answer.release(final=True):
            job.sink(Delta(piece))
        job.done = True
        n = len(job.answer.token_ids)
        self.stats.finished += 1
        self.stats.completion_tokens += n
        job.sink(Finished(job.answer.text, job.answer.reason or "length", job.prompt_tokens, n))

    def _fail(self, job: Job, error: EngineError) -> None:
        job.done = True
        self.stats.failed += 1
        try:
            job.sink(Failed(error))
        except Exception:
            log.exception("could not report the failure of %s", job.id)

    def _count_cancelled(self, job: Job) -> None:
        if not job.done:
            job.done = True
            with self._cond:  # `cancel` counts queued jobs from other threads
                self.stats.cancelled += 1

    def _leave(self) -> None:
        """Finished and cancelled sequences free their slots."""
        for job in self._running:
            if job.cancelled:
                self._count_cancelled(job)
        self._release([job.slot for job in self._running if job.done])
        self._running = [job for job in self._running if not job.done]
        self.stats.batch = len(self._running)

    def _log_stats(self) -> None:
        if not self.stats_interval:
            return
        now = time.monotonic()
        if now - self._last_stats >= self.stats_interval and (self._running or self._waiting):
            self._last_stats = now
            log.info("stats: %s", self.stats_line())

    def stats_line(self) -> str:
        """The stats log line's text: the counters, and the feature cache's when it is on."""
        s = self.stats
        line = (f"queue={s.queue} batch={s.batch} peak_batch={s.peak_batch} steps={s.steps} "
                f"mean_batch={s.step_rows / max(1, s.steps):.2f} finished={s.finished} "
                f"failed={s.failed} cancelled={s.cancelled}")
        if (cache := self.feature_cache) is not None:
            line += (f" feature_cache_hits={cache.hits} feature_cache_misses={cache.misses} "
                     f"feature_cache_mb={cache.bytes / 2**20:.1f}")
        return line


def shutting_down(detail: str = "") -> EngineError:
    message = "the server is shutting down" + (f": {detail}" if detail else "")
    return EngineError(Refusal.SHUTTING_DOWN, message)


def _as_engine_error(e: Exception, job: Job) -> EngineError:
    """What a request that raised `e` gets: an EngineError as is, a shortv error (a bad
    prompt or image) as bad input, anything else as internal (logged with its traceback)."""
    if isinstance(e, EngineError):
        return e
    if isinstance(e, ContextLengthError):
        return EngineError(Refusal.TOO_LONG, str(e), param="messages")
    if isinstance(e, ShortVError):
        return EngineError(Refusal.BAD_INPUT, str(e))
    log.error("%s failed", job.id, exc_info=e)
    return EngineError(Refusal.INTERNAL, f"internal error: the server failed on this request (its log "
                                         f"has the details under {job.id})")


def _buckets(max_batch: int) -> list[int]:
    """The numbers of rows a decode step runs on: powers of two, and max_batch."""
    return sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch})


def _pick(logits: Tensor, jobs: Sequence[Job]) -> list[int | None]:
    """Each row's next token, with its own job's options and generator (None where
    sampling raised; that job fails)."""
    logits = _biased(logits, jobs)
    greedy = logits.argmax(dim=-1).tolist() if any(j.options.temperature == 0 for j in jobs) else []
    out: list[int | None] = []
    for i, job in enumerate(jobs):
        if job.options.temperature == 0:
            out.append(greedy[i])
            continue
        try:
            out.append(int(pick(logits[i: i + 1], job.options, job.generator)[0]))
        except Exception:
            log.exception("sampling failed for %s", job.id)
            out.append(None)
    return out


def _biased(logits: Tensor, jobs: Sequence[Job]) -> Tensor:
    """The logits [B, vocab] with each row's job's logit_bias added (a copy, if any)."""
    if not any(job.bias_ids is not None for job in jobs):
        return logits
    logits = logits.clone()
    for row, job in enumerate(jobs):
        if job.bias_ids is not None and job.bias_values is not None:
            logits[row].index_add_(0, job.bias_ids, job.bias_values.to(logits.dtype))
    return logits
