"""The HTTP side: OpenAI's chat-completions API on Starlette, served by uvicorn.

Endpoints: `POST /v1/chat/completions` (JSON, or server-sent events with `stream`),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus text).
Handlers are async; they check a request (off the event loop, since it decodes images),
hand it to the `Engine` and relay its events. A request answers only once its prompt is
prefilled, so a prompt the model cannot take is a 400 even when streaming. A client that
goes away (noticed by listening for `http.disconnect`) has its job cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..models.feature_cache import FeatureCache
from .engine import Delta, Engine, Event, Failed, Finished, Histogram, Job, Started
from .errors import RequestError
from .limits import Limits
from .protocol import body_too_large, chunk, completion, parse_chat_request, sse, usage

log = logging.getLogger("shortv.serve")

DISCONNECTED = 499  # what the request log says of a client that went away (nginx's code)


def create_app(engine: Engine, *, limits: Limits | None = None, model_name: str | None = None,
               on_ready: Callable[[], None] | None = None) -> Starlette:
    """The ASGI app serving `engine.model` as `model_name` (default: the model's name). Its
    lifespan starts the engine and, at shutdown, stops it; `on_ready` runs once serving."""
    api = _Api(engine, limits or Limits(), model_name or engine.model.name or "shortv")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    routes = [
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ]
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)  # type: ignore[arg-type]


class _Api:
    def __init__(self, engine: Engine, limits: Limits, model_name: str) -> None:
        self.engine = engine
        self.limits = limits
        self.model_name = model_name
        self.created = int(time.time())

    # ---- chat completions -------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        started = time.perf_counter()
        try:
            body = await _read_body(request, self.limits.max_body_bytes)
            chat = await run_in_threadpool(parse_chat_request, body, model_name=self.model_name,
                                           template=self.engine.model.template, limits=self.limits)
            method = None if chat.method is None else self.engine.method_for(chat.method)
        except RequestError as e:
            return self._error(rid, e, started)
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(event: Event) -> None:  # called on the engine's thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(rid, chat.prompt, chat.images, chat.options, sink, strict_budget=chat.max_tokens_given,
                  logit_bias=chat.logit_bias, method=method)
        try:
            self.engine.submit(job)
        except RequestError as e:
            return self._error(rid, e, started)
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        handed_over = False
        try:
            first = await _next(events, watcher)
            if isinstance(first, Failed):
                return self._error(rid, first.error, started)
            if first is None:
                return self._gone(rid, job, started)
            assert isinstance(first, Started)
            if chat.stream:
                handed_over = True
                return _EventStream(self, rid, job, events, watcher, first.prompt_tokens,
                                    chat.include_usage, started)
            while True:
                event = await _next(events, watcher)
                if event is None:
                    return self._gone(rid, job, started)
                if isinstance(event, Failed):
                    return self._error(rid, event.error, started)
                if isinstance(event, Finished):
                    self._log(rid, 200, started, event.prompt_tokens, event.completion_tokens, event.reason)
                    return JSONResponse(completion(rid, self.model_name, event.text, event.reason,
                                                   event.prompt_tokens, event.completion_tokens))
        finally:
            if not handed_over:
                watcher.cancel()
                if not job.done:  # a disconnect, or this task was cancelled
                    self.engine.cancel(job)

    def _error(self, rid: str, error: RequestError, started: float) -> JSONResponse:
        log.info("%s %d ms=%.1f error=%s", rid, error.status, _ms(started), error.message)
        return JSONResponse(error.body(), status_code=error.status)

    def _gone(self, rid: str, job: Job, started: float) -> Response:
        self.engine.cancel(job)
        self._log(rid, DISCONNECTED, started, job.prompt_tokens, _generated(job), "client disconnected")
        return Response(status_code=DISCONNECTED)  # nobody reads it

    def _log(self, rid: str, status: int, started: float, prompt: int, completion_: int, end: str) -> None:
        log.info("%s %d prompt=%d completion=%d finish=%s ms=%.1f", rid, status, prompt, completion_,
                 end, _ms(started))

    # ---- the rest ------------------------------------------------------------------------------

    def _card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "shortv"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.model_name:
            error = RequestError(404, f"the model {json.dumps(model_id)} does not exist; this server "
                                      f"serves {json.dumps(self.model_name)}", param="model",
                                 code="model_not_found")
            return JSONResponse(error.body(), status_code=404)
        return JSONResponse(self._card())

    async def health(self, request: Request) -> Response:
        if self.engine.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not self.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_name})

    async def metrics(self, request: Request) -> Response:
        s = self.engine.stats
        rows = [
            ("shortv_queue_length", "gauge", "requests waiting for a batch slot", s.queue),
            ("shortv_batch_size", "gauge", "sequences in the running batch", s.batch),
            ("shortv_batch_size_peak", "gauge", "the largest batch so far", s.peak_batch),
            ("shortv_decode_steps_total", "counter", "decode steps run", s.steps),
            ("shortv_decode_rows_total", "counter", "sequences advanced, summed over steps", s.step_rows),
            ("shortv_prompt_tokens_total", "counter", "prompt tokens prefilled", s.prompt_tokens),
            ("shortv_completion_tokens_total", "counter", "tokens generated", s.completion_tokens),
            ("shortv_compiles_after_warm_up_total", "counter",
             "graphs of the compiled decode step compiled while serving (--compile)", s.compiles),
            ("shortv_kv_cache_bytes", "gauge", "bytes of the KV cache, allocated at start",
             self.engine.kv_plan.nbytes),
            ("shortv_kv_cache_slots", "gauge", "sequences the KV cache holds (--max-batch)",
             self.engine.kv_plan.slots),
            ("shortv_kv_cache_positions", "gauge", "positions per slot (--max-context)",
             self.engine.kv_plan.capacity),
        ]
        lines = []
        for name, kind, text, value in rows:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP shortv_requests_total requests that reached the engine, by outcome",
                  "# TYPE shortv_requests_total counter"]
        for outcome in ("finished", "failed", "cancelled"):
            lines.append(f'shortv_requests_total{{outcome="{outcome}"}} {getattr(s, outcome)}')
        lines += _histogram_lines("shortv_time_to_first_token_seconds",
                                  "from a request's arrival at the engine to its first token", s.ttft)
        lines += _histogram_lines("shortv_inter_token_latency_seconds",
                                  "between two consecutive tokens of a request", s.inter_token)
        lines += _feature_cache_lines(self.engine.feature_cache)
        rss = _resident_bytes()
        if rss is not None:
            lines += ["# HELP process_resident_memory_bytes resident memory of the server process",
                      "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {rss}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


class _EventStream:
    """The server-sent events of one streamed answer (an ASGI response): a role chunk, a
    chunk per text piece, the finish chunk, the usage chunk if asked for, `[DONE]`."""

    def __init__(self, api: _Api, rid: str, job: Job, events: asyncio.Queue[Event],
                 watcher: asyncio.Future[None], prompt_tokens: int, include_usage: bool,
                 started: float) -> None:
        self.api, self.rid, self.job, self.events, self.watcher = api, rid, job, events, watcher
        self.prompt_tokens, self.include_usage, self.started = prompt_tokens, include_usage, started

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        api, rid, created = self.api, self.rid, int(time.time())
        status, completion_tokens, end = DISCONNECTED, 0, "client disconnected"

        async def emit(data: dict[str, Any] | str) -> None:
            await send({"type": "http.response.body", "body": sse(data), "more_body": True})

        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            await emit(chunk(rid, api.model_name, created, {"role": "assistant", "content": ""}))
            while True:
                event = await _next(self.events, self.watcher)
                if event is None:
                    return
                if isinstance(event, Delta):
                    await emit(chunk(rid, api.model_name, created, {"content": event.text}))
                    continue
                if isinstance(event, Finished):
                    await emit(chunk(rid, api.model_name, created, reason=event.reason))
                    if self.include_usage:
                        await emit(chunk(rid, api.model_name, created,
                                         usage_=usage(event.prompt_tokens, event.completion_tokens)))
                    status, completion_tokens, end = 200, event.completion_tokens, event.reason
                elif isinstance(event, Failed):  # after the status line: an error event
                    await emit(event.error.body())
                    status, end = event.error.status, event.error.message
                await emit("[DONE]")
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
        finally:
            self.watcher.cancel()
            if not self.job.done:
                api.engine.cancel(self.job)
            if status == DISCONNECTED:
                completion_tokens = _generated(self.job)
            api._log(rid, status, self.started, self.prompt_tokens, completion_tokens, end)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body; RequestError once it passes `limit` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise body_too_large(limit)
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(part)
    return b"".join(chunks)


async def _disconnected(receive: Callable[[], Any]) -> None:
    """Returns when the client has gone away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _next(events: asyncio.Queue[Event], watcher: asyncio.Future[None]) -> Event | None:
    """The job's next event, or None if the client goes away first."""
    if not events.empty():
        return events.get_nowait()
    if watcher.done():
        return None
    get = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    return None


def _generated(job: Job) -> int:
    return len(job.answer.token_ids) if job.answer is not None else 0


def _ms(started: float) -> float:
    return 1000 * (time.perf_counter() - started)


def _histogram_lines(name: str, text: str, histogram: Histogram) -> list[str]:
    """A histogram in Prometheus text: cumulative buckets, sum and count."""
    lines = [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{le}"}} {n}' for le, n in histogram.cumulative()]
    return [*lines, f"{name}_sum {histogram.total}", f"{name}_count {histogram.count}"]


def _feature_cache_lines(cache: FeatureCache | None) -> list[str]:
    """The vision-feature cache's metrics (none when the cache is off)."""
    if cache is None:
        return []
    rows = [
        ("shortv_feature_cache_hits_total", "counter",
         "images whose visual tokens came from the feature cache (no vision tower run)", cache.hits),
        ("shortv_feature_cache_misses_total", "counter", "images the vision tower ran on", cache.misses),
        ("shortv_feature_cache_evictions_total", "counter",
         "feature cache entries dropped to make room (least recently used first)", cache.evictions),
        ("shortv_feature_cache_bytes", "gauge", "bytes of visual tokens held by the feature cache",
         cache.bytes),
        ("shortv_feature_cache_entries", "gauge", "images held by the feature cache", cache.entries),
        ("shortv_feature_cache_capacity_bytes", "gauge",
         "the feature cache's size limit (--feature-cache-mb)", cache.max_bytes),
    ]
    lines = []
    for name, kind, text, value in rows:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return lines


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return JSONResponse(RequestError(exc.status_code, message).body(), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    error = RequestError(500, "internal error: the server failed on this request (its log has the "
                              "details)", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


# ---- running it -------------------------------------------------------------------------------


def run_server(app: Starlette, engine: Engine, sock: socket.socket, *,
               shutdown_timeout: float = 30.0) -> None:
    """Serve `app` on a bound, listening socket until SIGTERM or Ctrl-C. Then new
    connections are refused, in-flight requests get `shutdown_timeout` seconds to finish,
    and whatever is left fails with a 503 (an error event on a stream)."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5)
    _Server(config, engine, shutdown_timeout).run(sockets=[sock])


class _Server(uvicorn.Server):
    """uvicorn's server, whose exit signals also drain the engine, and which returns (rather
    than re-raising the signal) once it has shut down gracefully."""

    def __init__(self, config: Any, engine: Engine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop now
            return
        if not self.should_exit:
            log.info("shutting down (%s): in-flight requests have %g s to finish",
                     signal.Signals(sig).name, self.shutdown_timeout)
        self.should_exit = True
        self.engine.drain(self.shutdown_timeout)
