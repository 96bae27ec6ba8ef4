"""The async gRPC load driver: streams Generate, timestamps every chunk (loopback only).

One `RequestResult` per request: start, TTFT, inter-token gaps, end-to-end latency,
tokens, the final gRPC status code, priority, and the server's retry hint (the
`grpc-retry-pushback-ms` trailer, `google.rpc.RetryInfo` in the status details, or
"retry after N ms" in the details text). Every run is bounded in count and in time:
requests still in flight at the deadline are cancelled and recorded as CANCELLED.

All times are seconds from the run's t0 (`time.perf_counter()` based).
"""
from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc

from serving.api.errors import RETRY_PUSHBACK_KEY
from serving.client import FINISH_REASONS

#: (request proto, priority name) for request number i
RequestFactory = Callable[[int], "tuple[Any, str]"]

_RETRY_AFTER_RE = re.compile(r"retry after (\d+(?:\.\d+)?)\s*ms", re.IGNORECASE)
_STREAMS_PER_CHANNEL = 64


@dataclass(slots=True)
class RequestResult:
    index: int
    priority: str                       # "interactive" | "batch"
    start_s: float                      # sent, seconds from the run's t0
    ttft_s: float | None = None         # start -> first token
    itl_s: list[float] = field(default_factory=list)   # gaps between consecutive tokens
    e2e_s: float | None = None          # start -> end of the RPC (any status)
    tokens: int = 0
    code: str = "PENDING"               # grpc.StatusCode name when done
    details: str = ""
    pushback_ms: float | None = None    # server's retry hint on RESOURCE_EXHAUSTED
    pushback_source: str | None = None  # "trailer" | "retry_info" | "details"
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def admitted(self) -> bool:
        """Not shed at the door: it got a first token, or finished OK."""
        return self.ttft_s is not None or self.code == "OK"

    @property
    def shed(self) -> bool:
        return self.code == "RESOURCE_EXHAUSTED" and self.ttft_s is None

    @property
    def end_s(self) -> float | None:
        return None if self.e2e_s is None else self.start_s + self.e2e_s

    @property
    def first_token_s(self) -> float | None:
        return None if self.ttft_s is None else self.start_s + self.ttft_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft_s is None or self.e2e_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)

    def token_times(self) -> list[float]:
        """Absolute time (from t0) of every token-carrying chunk."""
        if self.ttft_s is None:
            return []
        t = self.start_s + self.ttft_s
        out = [t]
        for gap in self.itl_s:
            t += gap
            out.append(t)
        return out

    def to_dict(self) -> dict:
        return {"index": self.index, "priority": self.priority, "start_s": self.start_s,
                "ttft_s": self.ttft_s, "e2e_s": self.e2e_s, "tokens": self.tokens,
                "code": self.code, "pushback_ms": self.pushback_ms,
                "pushback_source": self.pushback_source,
                "finish_reason": self.finish_reason}


def ensure_loopback(target: str) -> str:
    """HOST:PORT on this machine only (127.0.0.0/8, ::1, localhost); raises ValueError."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target must be HOST:PORT, got {target!r}")
    host = host.strip("[]")
    if host == "localhost":
        return target
    try:
        if ipaddress.ip_address(host).is_loopback:
            return target
    except ValueError:
        pass
    raise ValueError(f"target {target!r} is not a loopback address: the load generator only "
                     "drives this machine (127.0.0.1, ::1 or localhost)")


def pushback_of(trailers: Sequence[tuple[str, Any]] | None, details: str | None
                ) -> tuple[float | None, str | None]:
    """(retry hint in ms, where it was found): the `grpc-retry-pushback-ms` trailer
    ("trailer"), else google.rpc.RetryInfo in `grpc-status-details-bin` ("retry_info"),
    else "retry after N ms" in the details text ("details"); (None, None) if none."""
    for key, value in trailers or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return float(value), "trailer"
            except (TypeError, ValueError):
                pass
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            try:
                from google.rpc import error_details_pb2, status_pb2
                st = status_pb2.Status.FromString(value)
                for detail in st.details:
                    if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                        info = error_details_pb2.RetryInfo()
                        detail.Unpack(info)
                        return (info.retry_delay.seconds * 1e3 + info.retry_delay.nanos / 1e6,
                                "retry_info")
            except Exception:  # noqa: BLE001 - a malformed detail is just "no hint"
                pass
    m = _RETRY_AFTER_RE.search(details or "")
    return (float(m.group(1)), "details") if m else (None, None)


def pushback_ms_of(trailers: Sequence[tuple[str, Any]] | None, details: str | None) -> float | None:
    """The retry hint of a failed call in ms (see `pushback_of`), or None."""
    return pushback_of(trailers, details)[0]


class GrpcDriver:
    """Drives a moe_serving.v1 endpoint over grpc.aio. Use as `async with`."""

    def __init__(self, target: str, *, timeout_s: float = 120.0, application: str | None = None,
                 max_in_flight: int = 256, tenant: str | None = None, token: str | None = None):
        """`tenant` / `token`: who the load comes from (serving/api/tenants.py)."""
        from serving.api.protos import pb2_grpc  # generates the modules on first use
        from serving.client import call_metadata
        self.target = ensure_loopback(target)
        self.timeout_s = timeout_s
        self.metadata = call_metadata(application, tenant, token) or None
        self.max_in_flight = max_in_flight
        n = max(1, min(8, math.ceil(max_in_flight / _STREAMS_PER_CHANNEL)))
        # separate subchannel pools -> separate HTTP/2 connections (no per-connection stream cap)
        self.channels = [grpc.aio.insecure_channel(self.target, options=[
            ("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]) for _ in range(n)]
        self.stubs = [pb2_grpc.MoEServingStub(c) for c in self.channels]
        self._rr = 0

    async def __aenter__(self) -> "GrpcDriver":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.channels)), timeout_s)

    # ---- one request ------------------------------------------------------------------
    async def one(self, request: Any, priority: str, index: int, t0: float,
                  result: RequestResult | None = None) -> RequestResult:
        """Stream one Generate; fills (and returns) `result`, even when cancelled."""
        r = result or RequestResult(index=index, priority=priority, start_s=0.0)
        stub = self.stubs[self._rr % len(self.stubs)]
        self._rr += 1
        start = time.perf_counter()
        r.start_s = start - t0
        last: float | None = None
        call = stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
        try:
            async for chunk in call:
                now = time.perf_counter()
                n = len(chunk.token_ids)
                if n:
                    if last is None:
                        r.ttft_s = now - start
                    else:
                        r.itl_s.append(now - last)
                        r.itl_s.extend([0.0] * (n - 1))   # several tokens in one chunk
                    last = now
                    r.tokens += n
                if chunk.finish_reason:
                    r.finish_reason = FINISH_REASONS.get(chunk.finish_reason, "unknown")
            r.code = "OK"
        except grpc.aio.AioRpcError as e:
            r.code = e.code().name
            r.details = e.details() or ""
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                r.pushback_ms, r.pushback_source = pushback_of(
                    tuple(e.trailing_metadata() or ()), r.details)
        except asyncio.CancelledError:
            call.cancel()
            r.code, r.details = "CANCELLED", "cancelled by the load generator (deadline)"
            raise
        finally:
            r.e2e_s = time.perf_counter() - start
        return r

    # ---- closed loop: fixed concurrency ------------------------------------------------
    async def closed_loop(self, make_request: RequestFactory, *, concurrency: int,
                          num_requests: int, max_duration_s: float) -> tuple[list[RequestResult], float]:
        """`concurrency` workers send `num_requests` back to back. Returns (results in
        index order, wall seconds)."""
        return await _closed_loop(self.one, make_request, concurrency, num_requests, max_duration_s)

    # ---- open loop: scheduled arrivals -------------------------------------------------
    async def open_loop(self, make_request: RequestFactory, arrivals_s: Sequence[float], *,
                        max_duration_s: float, on_skip: Callable[[int, float], None] | None = None,
                        when_full: str = "skip", t0: float | None = None
                        ) -> tuple[list[RequestResult], float]:
        """Send request i at arrivals_s[i] (seconds from t0), at most `max_in_flight` at once.
        An arrival that finds the client full is skipped (when_full="skip": on_skip(i, t), so
        the offered load stays the profile's) or waits for a free slot ("wait", as vLLM's
        --max-concurrency). Everything still running at t0 + max_duration_s is cancelled."""
        return await _open_loop(self.one, make_request, arrivals_s, self.max_in_flight,
                                max_duration_s, on_skip, when_full, t0)


async def _closed_loop(one, make_request: RequestFactory, concurrency: int, num_requests: int,
                       max_duration_s: float) -> tuple[list[RequestResult], float]:
    results: list[RequestResult] = []
    next_index = 0
    t0 = time.perf_counter()
    deadline = t0 + max_duration_s

    async def worker() -> None:
        nonlocal next_index
        while next_index < num_requests and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            req, prio = make_request(i)
            r = RequestResult(index=i, priority=prio, start_s=time.perf_counter() - t0)
            results.append(r)
            await one(req, prio, i, t0, r)

    tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, min(concurrency, num_requests)))]
    await _wait_until(tasks, deadline)
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return results, wall


async def _open_loop(one, make_request: RequestFactory, arrivals_s: Sequence[float],
                     max_in_flight: int, max_duration_s: float,
                     on_skip: Callable[[int, float], None] | None, when_full: str,
                     t0: float | None) -> tuple[list[RequestResult], float]:
    results: list[RequestResult] = []
    t0 = time.perf_counter() if t0 is None else t0
    deadline = t0 + max_duration_s
    tasks: set[asyncio.Task] = set()
    for i, at in enumerate(arrivals_s):
        wait = t0 + float(at) - time.perf_counter()
        if t0 + float(at) >= deadline:
            break
        if wait > 0:
            await asyncio.sleep(wait)
        if len(tasks) >= max_in_flight:
            if when_full == "skip":
                if on_skip is not None:
                    on_skip(i, time.perf_counter() - t0)
                continue
            await asyncio.wait(set(tasks), timeout=max(0.0, deadline - time.perf_counter()),
                               return_when=asyncio.FIRST_COMPLETED)
            if len(tasks) >= max_in_flight:     # the deadline came first
                break
        req, prio = make_request(i)
        r = RequestResult(index=i, priority=prio, start_s=time.perf_counter() - t0)
        results.append(r)
        task = asyncio.ensure_future(one(req, prio, i, t0, r))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _wait_until(list(tasks), deadline)
    return results, time.perf_counter() - t0


async def _wait_until(tasks: list[asyncio.Task], deadline: float) -> None:
    """Wait for `tasks` until `deadline` (perf_counter); cancel whatever is left."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for t in tasks:     # surface bugs in the driver itself (not RPC failures, those are recorded)
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()
