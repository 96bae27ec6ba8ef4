"""AsyncEngine: runs Engine.step() on a background thread and streams TokenEvents to asyncio.

The step loop is the only thread that touches the model and the KV cache. Callers on the
event loop submit requests and consume events; a consumer that goes away (client cancel,
disconnect) aborts its request, which frees its KV slot at the next step boundary.

A step's events reach their event loop together, after the step: one wake-up of the loop per
step, not one per token (64 streams made 64 cross-thread wake-ups a step, each one a chance for
the event loop's thread to take the GIL from the step loop mid-step).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable, Iterable

from serving.engine.engine import Engine
from serving.engine.request import GenerationRequest, TokenEvent

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine could not finish a request it had accepted (e.g. an expert shard is gone)."""


class ExpertsUnreachable(EngineError):
    """The step kept failing with a retryable transport error (an expert shard gone and not back)
    for the whole retry window: an infrastructure outage, which the API answers UNAVAILABLE."""


class EngineCoreLost(EngineError):
    """The engine core's process died (serving/deployments/engine_core.py) with the request in
    flight: the replica is replaced; the API answers UNAVAILABLE with a retry delay."""


class AsyncEngine:
    def __init__(self, engine: Engine, step_retry_s: float = 60.0,
                 retryable: tuple[type[BaseException], ...] = ()):
        self.engine = engine
        self.step_retry_s = step_retry_s    # how long a failing step is retried before giving up
        self.retryable = retryable          # transport errors worth retrying (a shard restarting)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, object]] = []  # step thread only
        self.after_flush: Callable[[], None] | None = None   # step thread: after each step's events
        self._thread = threading.Thread(target=self._loop, name="engine-step-loop", daemon=True)
        self._thread.start()

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        def start(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self.submit(request, lambda ev: self._outbox.append((loop, queue, ev)))

        def end(finished: bool) -> None:
            if not finished:
                self.abort(request.request_id)
        return request_events(start, end)

    def submit(self, request: GenerationRequest, emit: Callable[[object], None]) -> None:
        """Add `request` with a raw `emit`, called on the step thread with each TokenEvent (or the
        exception that failed the request). The caller collects them (see `after_flush`)."""
        self.engine.add_request(request, emit)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def stream_chunks(self, request: GenerationRequest, chunk_tokens: int | Callable[[], int] = 1,
                      max_hold_s: float = 0.25) -> AsyncIterator[list[TokenEvent]]:
        """`stream`, in chunks (see `chunked`)."""
        return chunked(self.stream(request), chunk_tokens, max_hold_s)

    @property
    def thread_id(self) -> int | None:
        """The step loop's native thread id (its niceness is set per thread)."""
        return self._thread.native_id

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _flush(self) -> None:
        """Hand the events emitted since the last flush to their event loops, one call per loop;
        then `after_flush`, for events emitted through `submit`."""
        if self.after_flush is not None:
            self.after_flush()
        if not self._outbox:
            return
        out, self._outbox = self._outbox, []
        post_events(out)

    def _loop(self) -> None:
        failing_since = None
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                self._step()
                failing_since = None
            except self.retryable as exc:   # a shard is restarting: retry (K/V rewrites are idempotent)
                now = time.monotonic()
                failing_since = failing_since or now
                log.warning("engine step failed (%s); retrying", exc)
                if now - failing_since > self.step_retry_s:
                    self.engine.fail_all(ExpertsUnreachable(
                        f"engine step failing for {now - failing_since:.0f}s: {exc}"))
                    self._flush()
                    failing_since = None
                else:
                    time.sleep(0.2)
            except Exception as exc:        # a bug, not a transient fault: fail fast, keep serving
                log.exception("engine step failed")
                self.engine.fail_all(EngineError(f"engine step failed: {type(exc).__name__}: {exc}"))
                self._flush()

    def _step(self) -> None:
        try:
            self.engine.step()
        finally:                      # a failed step may have emitted some events already
            self._flush()


async def chunked(events: AsyncIterator[TokenEvent], chunk_tokens: int | Callable[[], int] = 1,
                  max_hold_s: float = 0.25) -> AsyncIterator[list[TokenEvent]]:
    """A request's events in chunks: the first token alone (TTFT), then up to `chunk_tokens` at a time
    (an int, or a callable asked at every token: the engine replica makes it follow the load),
    flushed early once the oldest held token has waited `max_hold_s` (checked when the next one
    arrives, so at most one engine step later), and with the finish.

    Every hop after the engine (Serve's streaming handle, the gRPC proxy, an Ingress replica if
    any) costs about a millisecond of CPU per message; with 64 streams that is a large share of
    a step.
    A chunk is one message carrying several tokens (GenerateResponse.token_ids is repeated).
    """
    loop = asyncio.get_running_loop()
    per_chunk = chunk_tokens if callable(chunk_tokens) else (lambda: chunk_tokens)
    held: list[TokenEvent] = []
    first, since = True, 0.0
    async for ev in events:
        if not held:
            since = loop.time()
        held.append(ev)
        if (first or ev.finish_reason is not None or len(held) >= per_chunk()
                or loop.time() - since >= max_hold_s):
            first = False
            out, held = held, []
            yield out
    if held:                   # only reached if the stream ended without a finish event
        yield held


async def request_events(start: Callable[[asyncio.AbstractEventLoop, asyncio.Queue], None],
                         end: Callable[[bool], None]) -> AsyncIterator[TokenEvent]:
    """One request's events, as `post_events` puts them into its queue, up to its finish event (an
    exception in the queue is raised). `start(loop, queue)` submits the request, at the first
    iteration; `end(finished)` runs when the stream ends, finished=False if the consumer stopped
    before the finish event (the request is to be aborted)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    start(loop, queue)
    finished = False
    try:
        while True:
            ev = await queue.get()
            if isinstance(ev, BaseException):
                finished = True
                raise ev
            yield ev
            if ev.finish_reason is not None:
                finished = True
                return
    finally:
        end(finished)


def post_events(events: Iterable[tuple[asyncio.AbstractEventLoop, asyncio.Queue, object]]) -> None:
    """Put each (loop, queue, event)'s event into its queue on its loop's thread: one call, and one
    wake-up, per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
    for loop, queue, ev in events:
        by_loop.setdefault(loop, []).append((queue, ev))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:      # that loop is closed: nobody is left to read its events
            pass


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)
