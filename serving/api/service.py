"""The servicer logic behind the gRPC ingress: proto in, engine events out, proto back.

`GenerateService` is a plain object (no Ray import). The app's ingress deployment wraps
it with methods named after the RPCs (serving/deployments/grpc_face.py); `local_server.py`
serves it from a plain grpc.aio server for tests and debugging.

How a non-OK status reaches the client (read from ray/serve 2.60 source):

- The proxy copies the replica's `RayServegRPCContext` (code, details, trailing
  metadata) onto the real gRPC context only when a *result* arrives from the replica
  (`context._set_on_grpc_context(...)` per yielded item in `gRPCProxy.send_request_to_replica`).
- Unary (Complete, Check): set the code, return an (empty) response -> the client gets
  the code, the details and the trailing metadata.
- Server streaming (Generate) with *zero* yields: nothing is ever copied, so a code set
  on the context is lost and the client sees OK with an empty stream. The method must
  *raise* after setting the code: the replica then wraps the exception in
  `gRPCStatusError(code, details)` (`_maybe_wrap_grpc_exception`) and the proxy answers
  with that code and details. Trailing metadata set before the raise is NOT carried
  (only code + details survive), so on Generate the retry hint is also in the details.
  `generate` therefore raises `RpcAbort` after setting the status; the local adapter
  swallows it (plain grpc.aio sends whatever code is set on its context).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

import grpc

from serving.api.errors import (LOST_REPLICA_RETRY_MS, Draining, InvalidRequest, Overloaded, RpcAbort,
                                 Unauthenticated, is_lost_replica, lost_replica_details, retry_trailers)
from serving.api.protos import SERVICE_NAME, health_pb2, pb2
from serving.api.tenants import DEFAULT_TENANT, UNIDENTIFIED_LABEL, Release, TenantGate
from serving.api.validation import ApiLimits, Tokenizer, num_completions, prompt_token_ids, validate_request
from serving.engine.async_engine import EngineCoreLost, ExpertsUnreachable
from serving.engine.request import FinishReason, GenerationRequest, Priority, TokenEvent
from serving.model.guided import GuidedDecodingUnavailable

logger = logging.getLogger(__name__)

_FINISH = {
    FinishReason.STOP: pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb2.FINISH_REASON_CANCELLED,
}


_PRIORITY_OF = {pb2.PRIORITY_UNSPECIFIED: Priority.INTERACTIVE,
                pb2.PRIORITY_INTERACTIVE: Priority.INTERACTIVE, pb2.PRIORITY_BATCH: Priority.BATCH}


class EngineClient(Protocol):
    """What the service needs from the engine (a replica handle, or the engine itself).

    `stream` yields one TokenEvent per generated token, or lists of consecutive ones (a chunk,
    streamed to the client as one GenerateResponse); the last event carries finish_reason.
    An event with token_id < 0 carries no token (a bare finish event).
    It may raise Overloaded (shed) or Draining (replica shutting down). Closing the
    iterator early (aclose) means the client went away: the engine should abort the
    request.
    """

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...


@dataclass(kw_only=True, slots=True)
class RequestRecord:
    """One finished RPC, for metrics and access logs (passed to `on_request_done`)."""
    request_id: str
    status: str                        # grpc.StatusCode name: "OK", "INVALID_ARGUMENT", ...
    priority: Priority | None          # None if the request was rejected before parsing it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0      # of prompt_tokens, found in the engine's prefix cache
    ttft_s: float | None = None        # service entry -> first token
    itl_s: list[float] = field(default_factory=list)   # gaps between consecutive tokens
    e2e_s: float = 0.0                 # service entry -> last event / error
    method: str = "Generate"           # "Generate", "Complete", "ModelInfer" or "ModelStreamInfer"
    tenant: str = DEFAULT_TENANT       # the caller's metric label (TenantGate.label)


class _Failure(Exception):
    """A status to end the RPC with (internal to this module)."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailers: list[tuple[str, str]] | None = None):
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers or []


def _retry_later(code: grpc.StatusCode, details: str, retry_after_ms: int) -> _Failure:
    """A status the client should retry after `retry_after_ms`: said in the details (which ends with
    "retry after N ms") and in the pushback trailers (unary calls carry them)."""
    return _Failure(code, details, retry_trailers(code, details, retry_after_ms))


def _failure_for(exc: BaseException, request_id: str) -> _Failure:
    if isinstance(exc, _Failure):
        return exc
    if isinstance(exc, InvalidRequest):
        return _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, GuidedDecodingUnavailable):
        return _Failure(grpc.StatusCode.UNIMPLEMENTED, str(exc))
    if isinstance(exc, Unauthenticated):
        return _Failure(grpc.StatusCode.UNAUTHENTICATED, exc.message)
    if isinstance(exc, Overloaded):
        ms = exc.retry_after_ms
        return _retry_later(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc.message}; retry after {ms} ms", ms)
    if type(exc).__name__ == "BackPressureError":      # ray.serve.exceptions, not imported
        return _retry_later(grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded; retry after 1000 ms", 1000)
    if isinstance(exc, Draining):
        return _Failure(grpc.StatusCode.UNAVAILABLE, exc.message)
    if is_lost_replica(exc):                   # an Ingress deployment whose engine replica died
        return _retry_later(grpc.StatusCode.UNAVAILABLE, lost_replica_details(exc), LOST_REPLICA_RETRY_MS)
    if isinstance(exc, ExpertsUnreachable):    # the shards stayed gone for the engine's retry window
        return _retry_later(grpc.StatusCode.UNAVAILABLE, f"expert shards unreachable ({exc}); retry after "
                            f"{LOST_REPLICA_RETRY_MS} ms", LOST_REPLICA_RETRY_MS)
    if isinstance(exc, EngineCoreLost):        # the engine core's process died; the replica is replaced
        return _retry_later(grpc.StatusCode.UNAVAILABLE, f"{exc}; tokens already streamed stand; retry "
                            f"after {LOST_REPLICA_RETRY_MS} ms", LOST_REPLICA_RETRY_MS)
    logger.error("request %s failed", request_id, exc_info=exc)
    return _Failure(grpc.StatusCode.INTERNAL,
                    f"internal error ({type(exc).__name__}); request_id={request_id}")


def set_status(ctx: Any, code: grpc.StatusCode, details: str, trailers: Sequence[tuple[str, Any]] = ()) -> None:
    """End the RPC of `ctx` (a RayServegRPCContext, a grpc.aio context, or None) with this status."""
    if ctx is None:
        return
    ctx.set_code(code)
    ctx.set_details(details)
    if trailers:
        try:   # RayServegRPCContext concatenates lists; grpc.aio's context wants a tuple
            ctx.set_trailing_metadata(list(trailers))
        except TypeError:
            ctx.set_trailing_metadata(tuple(trailers))


class _Tracker:
    """Timing and token counts of one RPC (of each of its completions, when it asks for n)."""

    def __init__(self, method: str):
        self.method = method
        self.t0 = time.perf_counter()
        self.last: float | None = None
        self.rec = RequestRecord(request_id="", status="OK", priority=None, method=method)
        self.completion: dict[int, int] = {}        # completion index -> tokens generated
        self.cached: dict[int, int] = {}            # completion index -> prompt tokens found cached

    def start(self, req: GenerationRequest) -> None:
        self.rec.request_id = req.request_id
        self.rec.priority = req.priority
        self.rec.prompt_tokens = len(req.prompt_token_ids)

    def on_event(self, ev: TokenEvent, index: int = 0) -> None:
        now = time.perf_counter()
        if ev.token_id >= 0:
            if self.last is None:
                self.rec.ttft_s = now - self.t0
            else:
                self.rec.itl_s.append(now - self.last)
            self.last = now
            self.completion[index] = self.completion.get(index, 0) + 1
        if ev.completion_tokens:
            self.completion[index] = ev.completion_tokens
        self.rec.completion_tokens = sum(self.completion.values())
        if ev.prompt_tokens:
            self.rec.prompt_tokens = ev.prompt_tokens
        if ev.cached_tokens:
            self.cached[index] = ev.cached_tokens
            self.rec.cached_prompt_tokens = self.cached.get(0, 0)   # the prompt counts once: completion 0's

    def finish(self, status: str) -> RequestRecord:
        self.rec.status = status
        self.rec.e2e_s = time.perf_counter() - self.t0
        return self.rec


class GenerateService:
    """Validate, call the engine, stream tokens back; map every failure to a gRPC status.

    `ready` drives health (SERVING / NOT_SERVING); while it is False, new requests get
    UNAVAILABLE. `grpc_context` is Ray Serve's RayServegRPCContext or a grpc.aio context
    (anything with set_code / set_details / set_trailing_metadata, and invocation_metadata
    where `tenants` is set), or None.
    With `tenants` (serving/api/tenants.py) every Generate / Complete is first authenticated
    (UNAUTHENTICATED), then validated, then counted against its tenant's quota
    (RESOURCE_EXHAUSTED) until it ends; Tokenize is authenticated only; health checks need no token.
    """

    def __init__(self, tokenizer: Tokenizer, limits: ApiLimits, engine: EngineClient,
                 on_request_done: Callable[[RequestRecord], None] | None = None, *,
                 ready: bool = True, tenants: TenantGate | None = None):
        self.tokenizer = tokenizer
        self.limits = limits
        self.engine = engine
        self.on_request_done = on_request_done
        self.ready = ready
        self.tenants = tenants

    # ---- RPCs ---------------------------------------------------------------------

    def generate(self, request_pb: Any, grpc_context: Any = None, method: str = "Generate"
                 ) -> AsyncIterator[Any]:
        """Generate: one GenerateResponse per TokenEvent; the last has finish_reason+usage.
        (`method` names the RPC in the request's record: the KServe face calls this too.)

        On failure the status is set on `grpc_context` and RpcAbort is raised (see the
        module docstring for why a streaming method must raise under Ray Serve).
        """
        return self._generate(request_pb, grpc_context, method)

    async def _generate(self, request_pb: Any, grpc_context: Any, method: str
                        ) -> AsyncIterator[Any]:
        tracker = _Tracker(method)
        tracker.rec.request_id = request_pb.request_id
        tracker.rec.priority = _PRIORITY_OF.get(int(request_pb.priority))
        status = "CANCELLED"            # if we are torn down mid-stream (client went away)
        release: Release | None = None
        n = 1
        try:
            req, n, release = self._admit(request_pb, grpc_context, tracker)
            tracker.start(req)
            finished = 0
            source = self._engine_stream(req) if n == 1 else self._engine_streams(req, n)
            async with aclosing(source) as chunks:
                async for item in chunks:
                    index, events = (0, item) if n == 1 else item
                    for ev in events:
                        tracker.on_event(ev, index)
                    finished += events[-1].finish_reason is not None
                    yield self._chunk(req, events, tracker, index)
                    if finished == n:
                        break
            if finished < n:
                raise _Failure(grpc.StatusCode.INTERNAL, "engine stream ended without a "
                               f"finish reason; request_id={req.request_id}")
            status = "OK"
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            failure = _failure_for(exc, tracker.rec.request_id or request_pb.request_id)
            status = failure.code.name
            set_status(grpc_context, failure.code, failure.details, failure.trailers)
            raise RpcAbort(failure.code, failure.details) from None
        finally:
            if release is not None:       # what it did not generate goes back to its tenant's bucket
                release(max(0, n * req.sampling.max_tokens - tracker.rec.completion_tokens))
            self._done(tracker.finish(status))

    async def complete(self, request_pb: Any, grpc_context: Any = None) -> Any:
        """Complete: the whole completion in one CompleteResponse.

        On failure: the status is set on `grpc_context` and an empty CompleteResponse is
        returned (Ray's proxy carries code, details and trailers of unary replies). With
        no context, RpcAbort is raised instead.
        """
        out = pb2.CompleteResponse()
        parts: dict[int, Any] = {}                 # completion index -> pb2.Completion
        texts: dict[int, list[str]] = {}
        gen = self._generate(request_pb, grpc_context, "Complete")
        try:
            async for chunk in gen:
                out.request_id = chunk.request_id
                c = parts.setdefault(chunk.index, pb2.Completion(index=chunk.index))
                texts.setdefault(chunk.index, []).append(chunk.text)
                c.token_ids.extend(chunk.token_ids)
                c.logprobs.extend(chunk.logprobs)
                c.top_logprobs.extend(chunk.top_logprobs)
                out.prompt_logprobs.extend(chunk.prompt_logprobs)
                out.prompt_top_logprobs.extend(chunk.prompt_top_logprobs)
                if chunk.finish_reason:
                    c.finish_reason = chunk.finish_reason
                    c.usage.CopyFrom(chunk.usage)
        except RpcAbort:
            if grpc_context is None:
                raise
            return pb2.CompleteResponse()
        finally:
            await gen.aclose()
        for i, c in parts.items():
            c.text = "".join(texts[i])
        first = parts[0]
        out.text, out.finish_reason = first.text, first.finish_reason
        out.token_ids.extend(first.token_ids)
        out.logprobs.extend(first.logprobs)
        out.top_logprobs.extend(first.top_logprobs)
        out.usage.CopyFrom(first.usage)
        if len(parts) > 1:                         # n > 1: every completion; the prompt counts once (its
            out.completions.extend(parts[i] for i in sorted(parts))       # cache hits: completion 0's)
            out.usage.completion_tokens = sum(c.usage.completion_tokens for c in parts.values())
        return out

    def tokenize(self, request_pb: Any, grpc_context: Any = None) -> Any:
        """Tokenize: the prompt's token ids as Generate would run them, and the limits a request
        must keep. Ready and (with tenants) authenticated first, as Generate; no quota is spent and
        nothing is recorded as a request. On failure as `complete`: the status on `grpc_context`
        and an empty TokenizeResponse, or RpcAbort without a context."""
        try:
            if not self.ready:
                raise Draining("server is not ready")
            if self.tenants is not None:
                self.tenants.identify(grpc_context.invocation_metadata() if grpc_context is not None else ())
            ids = prompt_token_ids(request_pb, self.limits, self.tokenizer)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            failure = _failure_for(exc, "")
            set_status(grpc_context, failure.code, failure.details, failure.trailers)
            if grpc_context is None:
                raise RpcAbort(failure.code, failure.details) from None
            return pb2.TokenizeResponse()
        return pb2.TokenizeResponse(token_ids=ids, max_model_len=self.limits.max_model_len,
                                    max_tokens_limit=self.limits.max_tokens_limit)

    def check(self, request_pb: Any, grpc_context: Any = None) -> Any:
        """grpc.health.v1.Health/Check: "" and our service name are known."""
        if request_pb.service not in ("", SERVICE_NAME):
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request_pb.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if self.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING)

    def record_refused(self, method: str, code: grpc.StatusCode, request_id: str = "") -> None:
        """Count a request another face refused before it reached this service (KServe: a model
        this server does not serve), like any other finished request."""
        tracker = _Tracker(method)
        tracker.rec.request_id = request_id
        if self.tenants is not None:
            tracker.rec.tenant = UNIDENTIFIED_LABEL       # refused before its caller was identified
        self._done(tracker.finish(code.name))

    # ---- helpers ------------------------------------------------------------------

    def _admit(self, request_pb: Any, grpc_context: Any, tracker: _Tracker
               ) -> tuple[GenerationRequest, int, Release | None]:
        """Ready, then who is calling, then a valid request, then within its tenant's quota:
        the request, its number of completions, and the lease on that quota (None without tenants)."""
        if not self.ready:
            raise Draining("server is not ready")
        if self.tenants is None:
            req = validate_request(request_pb, self.limits, self.tokenizer)
            return req, num_completions(request_pb, self.limits), None
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        tracker.rec.tenant = UNIDENTIFIED_LABEL          # until identify() names the caller
        tenant = self.tenants.identify(metadata)
        tracker.rec.tenant = self.tenants.label(tenant)
        # the tenant salts the prefix cache: its hits never reveal another tenant's prompts
        req = replace(validate_request(request_pb, self.limits, self.tokenizer), cache_salt=tenant)
        n = num_completions(request_pb, self.limits)
        return req, n, self.tenants.acquire(tenant, len(req.prompt_token_ids) + n * req.sampling.max_tokens)

    async def _engine_stream(self, req: GenerationRequest) -> AsyncIterator[list[TokenEvent]]:
        """The engine's events as non-empty chunks (lists), whichever the engine client yields."""
        stream = self.engine.stream(req)
        exhausted = False
        try:
            async for item in stream:
                events = item if isinstance(item, list) else [item]
                if not events:
                    continue
                exhausted = events[-1].finish_reason is not None
                yield events
            exhausted = True
        finally:
            if not exhausted:       # stopped before the finish event: client gone, or error
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
                elif callable(getattr(stream, "cancel", None)):
                    stream.cancel()     # e.g. a Ray DeploymentResponseGenerator

    async def _engine_streams(self, req: GenerationRequest, n: int
                              ) -> AsyncIterator[tuple[int, list[TokenEvent]]]:
        """(completion index, chunk) of the n completions of `req`, interleaved as they come.
        Each is an engine request of its own (id `<request_id>/<i>`, seed + i where a seed is set).
        Completion 0 starts first; the others start once it has its first token, so its prompt is
        in the prefix cache and they reuse the K/V. Nothing is yielded until every completion has
        its first event: a completion the engine refuses (shed, draining) fails the call before
        any token reached the client, and the others are closed (the engine aborts them)."""
        seed = req.sampling.seed
        subs = [replace(req, request_id=f"{req.request_id}/{i}",      # the prompt is scored once (completion 0)
                        sampling=replace(req.sampling, seed=None if seed is None else seed + i,
                                         prompt_logprobs=req.sampling.prompt_logprobs if i == 0 else None))
                for i in range(n)]
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            finished = False
            try:
                async with aclosing(self._engine_stream(subs[i])) as chunks:
                    async for events in chunks:
                        finished = events[-1].finish_reason is not None
                        queue.put_nowait((i, events))
                        if finished:
                            return
                queue.put_nowait((i, _Failure(grpc.StatusCode.INTERNAL, "engine stream ended without a "
                                              f"finish reason; request_id={subs[i].request_id}")))
            except Exception as exc:  # noqa: BLE001 - handed to the caller, which fails the call
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(0))]
        held: list[tuple[int, list[TokenEvent]]] = []    # until every completion has started
        started: set[int] = set()
        try:
            while True:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if len(tasks) == 1:                      # completion 0's prompt is cached now
                    tasks += [asyncio.create_task(pump(j)) for j in range(1, n)]
                started.add(i)
                held.append((i, item))
                if len(started) == n:
                    for one in held:
                        yield one
                    held = []
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _chunk(self, req: GenerationRequest, events: list[TokenEvent], tracker: _Tracker, index: int = 0) -> Any:
        chunk = pb2.GenerateResponse(request_id=req.request_id, text="".join(e.text_delta for e in events),
                                     index=index)
        for e in events:
            if e.prompt_logprobs is not None:
                chunk.prompt_logprobs.extend(e.prompt_logprobs)
                for ids, lps in e.prompt_top_logprobs or ():
                    chunk.prompt_top_logprobs.add(token_ids=ids, logprobs=lps)
            if e.token_id >= 0:
                chunk.token_ids.append(e.token_id)
                if req.sampling.logprobs and e.logprob is not None:
                    chunk.logprobs.append(float(e.logprob))
                if req.sampling.top_logprobs and e.top_logprobs is not None:
                    chunk.top_logprobs.add(token_ids=e.top_logprobs[0], logprobs=e.top_logprobs[1])
        ev = events[-1]
        if ev.finish_reason is not None:           # this completion's usage
            chunk.finish_reason = _FINISH[FinishReason(ev.finish_reason)]
            chunk.usage.prompt_tokens = tracker.rec.prompt_tokens
            chunk.usage.completion_tokens = tracker.completion.get(index, 0)
            chunk.usage.cached_prompt_tokens = tracker.cached.get(index, 0)
        return chunk

    def _done(self, record: RequestRecord) -> None:
        if self.on_request_done is None:
            return
        try:
            self.on_request_done(record)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            logger.exception("on_request_done callback failed")
