"""GenerateService over real gRPC on loopback: a plain grpc.aio server (local_server.py),
a fake deterministic engine, and the real client / CLI."""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from typing import AsyncIterator

import grpc
import pytest

from serving.api.errors import Draining, Overloaded, RpcAbort
from serving.api.local_server import ByteTokenizer, start_local_server
from serving.api.protos import SERVICE_NAME, health_pb2, pb2, pb2_grpc
from serving.api.service import GenerateService, RequestRecord
from serving.api.validation import ApiLimits
from serving.client import MoEClient, add_generate_arguments, build_request, continuation, run_generate
from serving.engine.async_engine import ExpertsUnreachable
from serving.engine.request import FinishReason, GenerationRequest, Priority, TokenEvent

TOK = ByteTokenizer()
LIMITS = ApiLimits(vocab_size=TOK.vocab_size, max_model_len=64, max_tokens_limit=32)
WAIT_S = 10.0


class FakeEngine:
    """Token i of a request has id 98 + i, i.e. text "a", "b", ... (ByteTokenizer), logprob -0.5 * (i + 1).

    request_id prefixes pick a behaviour: busy -> Overloaded, drain -> Draining,
    boom -> RuntimeError, gone -> ExpertsUnreachable (the shards stayed away for the engine's
    retry window), eos -> STOP after 2 tokens, slow -> 50 ms per token,
    nofinish -> ends without a finish_reason, chunk -> lists of up to 3 events (as the
    EngineReplica streams them), ctx -> each token follows from the whole context (prompt and
    tokens so far), as a model's would, lost -> the same, but the replica dies (Ray's
    ActorDiedError) after 5 tokens of a request whose prompt is short (not a continuation),
    cached -> the engine found all but the prompt's last token in its prefix cache,
    seeded -> token i is 98 + (seed + i) mod 26 (so each of n seeded completions differs),
    partial -> completion 0 (id ending "/0") streams slowly, the others are shed (Overloaded).
    """

    def __init__(self):
        self.closed: list[str] = []       # request ids whose stream was closed/finished
        self.requests: list[GenerationRequest] = []    # every request that reached the engine

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        rid = request.request_id
        self.requests.append(request)
        try:
            if rid.startswith("busy") or (rid.startswith("partial") and not rid.endswith("/0")):
                raise Overloaded("engine queue full", retry_after_s=0.25)
            if rid.startswith("drain"):
                raise Draining("replica draining")
            if rid.startswith("boom"):
                raise RuntimeError("kaboom")
            if rid.startswith("gone"):
                raise ExpertsUnreachable("engine step failing for 61s: shard 1 unreachable")
            if rid.startswith(("ctx", "lost")):
                async for ev in self._from_context(request):
                    yield ev
                return
            n = 2 if rid.startswith("eos") else request.sampling.max_tokens
            held = []
            for i in range(n):
                if rid.startswith(("slow", "partial")):
                    await asyncio.sleep(0.05)
                last = i == n - 1 and not rid.startswith("nofinish")
                tok = 98 + ((i + (request.sampling.seed or 0) if rid.startswith("seeded") else i) % 26)
                ev = TokenEvent(
                    request_id=rid, token_id=tok, text_delta=TOK.decode([tok]),
                    logprob=-0.5 * (i + 1) if request.sampling.logprobs else None,
                    finish_reason=(FinishReason.STOP if rid.startswith("eos")
                                   else FinishReason.LENGTH) if last else None,
                    prompt_tokens=len(request.prompt_token_ids), completion_tokens=i + 1,
                    cached_tokens=len(request.prompt_token_ids) - 1 if rid.startswith("cached") else 0,
                    top_logprobs=(tuple(range(tok, tok + request.sampling.top_logprobs)),
                                  tuple(-0.5 * (i + 1) - j for j in range(request.sampling.top_logprobs)))
                    if request.sampling.top_logprobs else None,
                    **(self._prompt_logprobs(request) if i == 0 else {}))
                if not rid.startswith("chunk"):
                    yield ev
                    continue
                held.append(ev)
                if len(held) == 3 or last:
                    out, held = held, []
                    yield out
        finally:
            self.closed.append(rid)

    @staticmethod
    def _prompt_logprobs(request: GenerationRequest) -> dict:
        """prompt_logprobs: prompt token j (j >= 1) gets -0.1 * j, its top ids j, j + 1, ..."""
        k, n = request.sampling.prompt_logprobs, len(request.prompt_token_ids)
        if k is None:
            return {}
        return dict(prompt_logprobs=tuple(-0.1 * j for j in range(1, n)),
                    prompt_top_logprobs=tuple((tuple(range(j, j + k)), tuple(-0.1 * j - m for m in range(k)))
                                              for j in range(1, n)) if k else None)

    @staticmethod
    async def _from_context(request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        context = list(request.prompt_token_ids)
        n = request.sampling.max_tokens
        for i in range(n):
            if request.request_id.startswith("lost") and i == 5 and len(request.prompt_token_ids) < 6:
                from ray.exceptions import ActorDiedError
                raise ActorDiedError()
            tok = 98 + (len(context) * 7 + sum(context)) % 26
            context.append(tok)
            yield TokenEvent(request_id=request.request_id, token_id=tok, text_delta=TOK.decode([tok]),
                             logprob=None, finish_reason=FinishReason.LENGTH if i == n - 1 else None,
                             prompt_tokens=len(request.prompt_token_ids), completion_tokens=i + 1)


class Harness:
    """The server on its own event loop thread; tests use the blocking client."""

    def __init__(self):
        self.engine = FakeEngine()
        self.records: list[RequestRecord] = []
        self.service = GenerateService(TOK, LIMITS, self.engine, self.records.append)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self.run(start_local_server(self.service))
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def wait_records(self, n: int) -> list[RequestRecord]:
        deadline = time.monotonic() + WAIT_S
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.records) >= n, self.records
        return self.records

    def close(self):
        try:
            self.run(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT_S)
            self.loop.close()


@pytest.fixture
def h():
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def client(h):
    with MoEClient(h.target, timeout_s=WAIT_S) as c:
        yield c


# ---- happy paths ------------------------------------------------------------------------

def test_generate_streams_one_chunk_per_token(h, client):
    chunks = list(client.generate(prompt="hi", max_tokens=3, request_id="r1"))
    assert [c.text for c in chunks] == ["a", "b", "c"]
    assert [list(c.token_ids) for c in chunks] == [[98], [99], [100]]
    assert all(c.request_id == "r1" for c in chunks)
    assert [c.finish_reason for c in chunks] == [0, 0, pb2.FINISH_REASON_LENGTH]
    assert not chunks[0].HasField("usage")
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 3)
    assert all(not c.logprobs for c in chunks)            # not requested
    rec = h.wait_records(1)[0]
    assert (rec.request_id, rec.status, rec.priority, rec.method) == ("r1", "OK",
                                                                      Priority.INTERACTIVE,
                                                                      "Generate")
    assert (rec.prompt_tokens, rec.completion_tokens) == (3, 3)
    assert rec.ttft_s is not None and len(rec.itl_s) == 2 and rec.e2e_s >= rec.ttft_s


def test_a_chunk_of_engine_events_is_one_response_with_every_token(h, client):
    chunks = list(client.generate(prompt="hi", max_tokens=7, request_id="chunk-1", logprobs=True))
    assert [list(c.token_ids) for c in chunks] == [[98, 99, 100], [101, 102, 103], [104]]
    assert [c.text for c in chunks] == ["abc", "def", "g"]
    assert [list(c.logprobs) for c in chunks] == [[-0.5, -1.0, -1.5], [-2.0, -2.5, -3.0], [-3.5]]
    assert [c.finish_reason for c in chunks] == [0, 0, pb2.FINISH_REASON_LENGTH]
    assert chunks[-1].usage.completion_tokens == 7
    rec = h.wait_records(1)[0]
    assert rec.status == "OK" and rec.completion_tokens == 7 and len(rec.itl_s) == 6


def test_usage_counts_the_prompt_tokens_served_from_the_prefix_cache(h, client):
    chunks = list(client.generate(prompt_ids=[5, 6, 7, 8], max_tokens=3, request_id="cached-1"))
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) == (4, 3, 3)
    resp = client.complete(prompt_ids=[5, 6, 7], max_tokens=2, request_id="cached-2")
    assert (resp.usage.prompt_tokens, resp.usage.cached_prompt_tokens) == (3, 2)
    assert client.complete(prompt_ids=[5, 6, 7], max_tokens=2).usage.cached_prompt_tokens == 0
    recs = h.wait_records(3)
    assert sorted(r.cached_prompt_tokens for r in recs) == [0, 2, 3]


def test_complete_and_logprobs(h, client):
    resp = client.complete(prompt_ids=[5, 6], max_tokens=4, logprobs=True, priority="batch")
    assert resp.text == "abcd" and list(resp.token_ids) == [98, 99, 100, 101]
    assert list(resp.logprobs) == [-0.5, -1.0, -1.5, -2.0]
    assert resp.finish_reason == pb2.FINISH_REASON_LENGTH
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (2, 4)
    assert len(resp.request_id) == 32                       # server-generated
    rec = h.wait_records(1)[0]
    assert (rec.status, rec.method, rec.priority) == ("OK", "Complete", Priority.BATCH)


def test_stream_logprobs_and_stop(client):
    chunks = list(client.generate(prompt="x", max_tokens=8, request_id="eos-1", logprobs=True))
    assert [list(c.logprobs) for c in chunks] == [[-0.5], [-1.0]]
    assert chunks[-1].finish_reason == pb2.FINISH_REASON_STOP


def test_build_request_accepts_prebuilt(client):
    req = build_request("hi", max_tokens=2)
    assert client.complete(req).text == "ab"
    with pytest.raises(TypeError):
        client.complete(req, max_tokens=3)


# ---- invalid requests -----------------------------------------------------------------

INVALID = [
    (dict(prompt=""), "prompt"),
    (dict(prompt_ids=[]), "prompt"),
    (dict(prompt_ids=[1, 300]), "prompt.token_ids"),
    (dict(prompt="a", max_tokens=0), "max_tokens"),
    (dict(prompt="a", max_tokens=-1), "max_tokens"),
    (dict(prompt="a", max_tokens=33), "max_tokens"),
    (dict(prompt_ids=list(range(1, 41)), max_tokens=30), "max_tokens"),
    (dict(prompt="a", temperature=-1.0), "temperature"),
    (dict(prompt="a", temperature=float("nan")), "temperature"),
    (dict(prompt="a", top_p=0.0), "top_p"),
    (dict(prompt="a", top_p=1.5), "top_p"),
    (dict(prompt="a", top_k=-2), "top_k"),
    (dict(prompt="a", seed=-1), "seed"),
    (dict(prompt="a", stop=[""]), "stop"),
    (dict(prompt="a", request_id="x" * 200), "request_id"),
    (dict(prompt="a", priority=9), "priority"),
]


@pytest.mark.parametrize("kwargs,field", INVALID, ids=[f for _, f in INVALID])
@pytest.mark.parametrize("method", ["generate", "complete"])
def test_invalid_argument_names_field(h, client, method, kwargs, field):
    with pytest.raises(grpc.RpcError) as ei:
        out = getattr(client, method)(**kwargs)
        if method == "generate":
            list(out)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details().startswith(f"{field}:"), ei.value.details()
    assert h.wait_records(1)[0].status == "INVALID_ARGUMENT"
    assert h.engine.closed == []                            # never reached the engine


# ---- engine failures ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["generate", "complete"])
def test_overload_is_resource_exhausted_with_pushback(h, client, method):
    with pytest.raises(grpc.RpcError) as ei:
        out = getattr(client, method)(prompt="a", request_id="busy-1")
        if method == "generate":
            list(out)
    err = ei.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after 250 ms" in err.details()
    assert dict(err.trailing_metadata())["grpc-retry-pushback-ms"] == "250"
    assert h.wait_records(1)[0].status == "RESOURCE_EXHAUSTED"


def test_draining_is_unavailable(client):
    with pytest.raises(grpc.RpcError) as ei:
        client.complete(prompt="a", request_id="drain-1")
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_lost_replica_is_unavailable_and_a_resumed_stream_gives_every_token(client):
    def run(rid: str, resume: int = 0, **kw) -> tuple[list[int], object]:
        tokens, last = [], None
        for chunk in client.generate(build_request(request_id=rid, max_tokens=12, temperature=0, **kw),
                                     resume=resume):
            tokens.extend(chunk.token_ids)
            last = chunk
        return tokens, last
    whole, whole_last = run("ctx-1", prompt_ids=[5, 6, 7])
    assert len(whole) == 12 and len(set(whole)) > 3
    with pytest.raises(grpc.RpcError) as e:          # no resume: the error, after the first tokens
        run("lost-1", prompt_ids=[5, 6, 7])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "replica serving this request was lost (ActorDiedError)" in e.value.details()
    assert "retry after 1000 ms" in e.value.details()
    t0 = time.monotonic()
    resumed, resumed_last = run("lost-2", resume=1, prompt_ids=[5, 6, 7])
    assert resumed == whole                          # the tokens of the undisturbed run, none twice
    assert time.monotonic() - t0 >= 0.9              # it waited the delay the status asked for
    assert resumed_last.finish_reason == pb2.FINISH_REASON_LENGTH
    assert (resumed_last.usage.prompt_tokens, resumed_last.usage.completion_tokens) == (
        whole_last.usage.prompt_tokens, 12)
    # a text prompt: resumed as the ids the server made of it (one Tokenize call at the break)
    text_whole, _ = run("ctx-2", prompt="ab")
    text_resumed, text_last = run("lost-3", resume=1, prompt="ab")
    assert text_resumed == text_whole and len(text_whole) == 12
    assert (text_last.usage.prompt_tokens, text_last.usage.completion_tokens) == (3, 12)
    with pytest.raises(grpc.RpcError) as e:          # max_tokens unset: what is left is not known
        list(client.generate(build_request(prompt_ids=[5, 6, 7], request_id="lost-4"), resume=1))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


class ResettingServicer(pb2_grpc.MoEServingServicer):
    """Generate yields token ids 10, 11, ...; a request whose prompt has 3 ids is reset after 5 tokens:
    the stream ends CANCELLED though the client cancelled nothing (what a client sees through HAProxy
    when the replica behind it dies)."""

    async def Generate(self, request, context):
        prompt = list(request.token_ids.ids)
        for i in range(request.max_tokens):
            if len(prompt) == 3 and i == 5:
                await context.abort(grpc.StatusCode.CANCELLED, "Stream removed")
            last = i == request.max_tokens - 1
            yield pb2.GenerateResponse(token_ids=[10 + len(prompt) - 3 + i],
                                       finish_reason=pb2.FINISH_REASON_LENGTH if last else 0)


def test_a_stream_reset_by_the_server_is_resumed_like_a_lost_replica():
    async def start():
        server = grpc.aio.server()
        pb2_grpc.add_MoEServingServicer_to_server(ResettingServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(WAIT_S)
    try:
        with MoEClient(f"127.0.0.1:{port}", WAIT_S) as c:
            got = []
            with pytest.raises(grpc.RpcError) as e:
                for chunk in c.generate(prompt_ids=[1, 2, 3], max_tokens=12):
                    got.extend(chunk.token_ids)
            assert e.value.code() == grpc.StatusCode.CANCELLED and got == [10, 11, 12, 13, 14]
            resumed = [t for ch in c.generate(prompt_ids=[1, 2, 3], max_tokens=12, resume=1) for t in ch.token_ids]
            assert resumed == list(range(10, 22))            # the rest asked for once, nothing twice
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()


def test_a_continuation_does_not_ask_for_the_prompt_logprobs_again():
    req = build_request(prompt_ids=[5, 6], max_tokens=8, prompt_logprobs=3)
    assert continuation(req, []).prompt_logprobs == 3          # nothing came back yet
    assert not continuation(req, [9]).HasField("prompt_logprobs")


def test_continuation_asks_for_what_is_left():
    req = build_request(prompt_ids=[1, 2], max_tokens=5, temperature=0.5, seed=3, request_id="r")
    rest = continuation(req, [7, 8])
    assert list(rest.token_ids.ids) == [1, 2, 7, 8] and rest.max_tokens == 3 and rest.resumed_tokens == 2
    assert (rest.temperature, rest.seed, rest.request_id) == (0.5, 3, "r")
    assert list(req.token_ids.ids) == [1, 2] and req.max_tokens == 5        # the original is untouched
    assert continuation(req, [7] * 5) is None                             # nothing left
    assert continuation(build_request(prompt="hi", max_tokens=5), [7]) is None          # ids unknown
    text = continuation(build_request(prompt="hi", max_tokens=5), [7], prompt_ids=[0, 105, 106])
    assert list(text.token_ids.ids) == [0, 105, 106, 7] and not text.HasField("text") and text.resumed_tokens == 1
    assert continuation(build_request(prompt_ids=[1], max_tokens=None), [7]) is None
    # min_tokens counts down with the tokens received (else it would exceed what is left of max_tokens)
    held = build_request(prompt_ids=[1], max_tokens=6, min_tokens=4, stop_token_ids=[9])
    assert [continuation(held, [7] * n).min_tokens for n in (1, 3, 4, 5)] == [3, 1, 0, 0]
    assert list(continuation(held, [7]).stop_token_ids) == [9]


@pytest.mark.parametrize("method", ["generate", "complete"])
def test_shards_gone_for_the_retry_window_is_unavailable_with_pushback(client, method):
    with pytest.raises(grpc.RpcError) as e:
        if method == "generate":
            list(client.generate(prompt="a", max_tokens=3, request_id="gone-1"))
        else:
            client.complete(prompt="a", max_tokens=3, request_id="gone-2")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.value.details().startswith("expert shards unreachable (engine step failing for 61s")
    assert "retry after 1000 ms" in e.value.details()
    if method == "complete":
        assert ("grpc-retry-pushback-ms", "1000") in (e.value.trailing_metadata() or ())


def test_engine_bug_is_internal_without_leaking(client):
    with pytest.raises(grpc.RpcError) as ei:
        list(client.generate(prompt="a", request_id="boom-1"))
    assert ei.value.code() == grpc.StatusCode.INTERNAL
    assert "boom-1" in ei.value.details() and "kaboom" not in ei.value.details()


def test_stream_without_finish_is_internal_after_tokens(client):
    got = []
    with pytest.raises(grpc.RpcError) as ei:
        for chunk in client.generate(prompt="a", max_tokens=2, request_id="nofinish-1"):
            got.append(chunk)
    assert ei.value.code() == grpc.StatusCode.INTERNAL and len(got) == 2


def test_not_ready_rejects_and_reports_not_serving(h, client):
    assert client.health() == "SERVING"
    assert client.health(SERVICE_NAME) == "SERVING"
    h.service.ready = False
    assert client.health() == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as ei:
        client.complete(prompt="a")
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tokenize_gives_the_ids_generate_runs_and_the_limits(h, client):
    """Tokenize: a text prompt as Generate runs it (BOS 0, then each byte + 1), token ids checked against
    the vocabulary, the limits; invalid prompts INVALID_ARGUMENT naming the field; a prompt too long
    to generate from is still tokenized; draining UNAVAILABLE; nothing reaches the engine and no
    request is recorded."""
    resp = client.tokenize(prompt="hi")
    assert (list(resp.token_ids), resp.max_model_len, resp.max_tokens_limit) == ([0, 105, 106], 64, 32)
    generated = client.complete(prompt="hi", max_tokens=1, request_id="tok-1")
    assert generated.usage.prompt_tokens == len(resp.token_ids)
    assert list(client.tokenize(prompt_ids=[5, 6, 7]).token_ids) == [5, 6, 7]
    assert len(client.tokenize(prompt="x" * 100).token_ids) == 101          # > max_model_len: still counted
    for kwargs, details in ((dict(prompt=""), "prompt: text is empty"),
                            (dict(prompt_ids=[5, 999]), "prompt.token_ids: id 999 at position 1"),
                            (dict(messages=[("user", "hi")]), "prompt.chat: this model has no chat template")):
        with pytest.raises(grpc.RpcError) as ei:
            client.tokenize(**kwargs)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ei.value.details().startswith(details)
    with pytest.raises(grpc.RpcError) as ei:
        client.tokenize(pb2.TokenizeRequest())
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ei.value.details().startswith("prompt:")
    with grpc.insecure_channel(h.target) as channel:                       # bytes that do not parse
        call = channel.unary_unary(f"/{SERVICE_NAME}/Tokenize", request_serializer=lambda b: b,
                                   response_deserializer=pb2.TokenizeResponse.FromString)
        with pytest.raises(grpc.RpcError) as ei:
            call(b"\xff\xff", timeout=WAIT_S)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid moe_serving.v1.TokenizeRequest" in ei.value.details()
    h.service.ready = False
    with pytest.raises(grpc.RpcError) as ei:
        client.tokenize(prompt="hi")
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [r.request_id for r in h.engine.requests] == ["tok-1"]
    assert [r.request_id for r in h.wait_records(1)] == ["tok-1"]


def test_cli_tokenize(h, capsys):
    from serving.client import add_tokenize_arguments, run_tokenize

    def tokenize(argv):
        parser = argparse.ArgumentParser()
        add_tokenize_arguments(parser)
        return run_tokenize(parser.parse_args(argv))
    assert tokenize(["--target", h.target, "--prompt", "hi", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"token_ids": [0, 105, 106], "count": 3, "max_model_len": 64,
                                                   "max_tokens_limit": 32}
    assert tokenize(["--target", h.target, "--prompt-ids", "7,8"]) == 0
    assert capsys.readouterr().out == "2 tokens (max_model_len 64, max_tokens_limit 32): 7,8\n"
    assert tokenize(["--target", h.target, "--prompt-ids", "7,999"]) == 2
    assert "INVALID_ARGUMENT: prompt.token_ids: id 999" in capsys.readouterr().err


def test_health_unknown_service(client):
    with pytest.raises(grpc.RpcError) as ei:
        client.health("no.such.Service")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_cancel_closes_engine_stream(h, client):
    gen = client.generate(prompt="a", max_tokens=30, request_id="slow-1")
    assert next(gen).text == "a"
    gen.close()                                             # cancels the RPC
    rec = h.wait_records(1)[0]
    assert rec.status == "CANCELLED" and rec.completion_tokens < 30
    assert h.engine.closed == ["slow-1"]


# ---- n completions -------------------------------------------------------------------

def test_n_completions_stream_interleaved_each_with_its_finish_and_usage(h, client):
    chunks = list(client.generate(prompt_ids=[5, 6], max_tokens=3, n=3, seed=10, request_id="seeded-1"))
    assert {c.request_id for c in chunks} == {"seeded-1"}
    by_index: dict[int, list] = {}
    for c in chunks:
        by_index.setdefault(c.index, []).append(c)
    assert sorted(by_index) == [0, 1, 2]
    for i, cs in by_index.items():      # completion i is sampled with seed 10 + i
        assert [t for c in cs for t in c.token_ids] == [98 + (10 + i + k) % 26 for k in range(3)]
        assert [c.finish_reason for c in cs] == [0, 0, pb2.FINISH_REASON_LENGTH]
        assert (cs[-1].usage.prompt_tokens, cs[-1].usage.completion_tokens) == (2, 3)
    # completion 0 reached the engine first (the others then find its prompt in the prefix cache)
    assert [r.request_id for r in h.engine.requests] == ["seeded-1/0", "seeded-1/1", "seeded-1/2"]
    assert [r.sampling.seed for r in h.engine.requests] == [10, 11, 12]
    rec = h.wait_records(1)[0]
    assert (rec.request_id, rec.status, rec.prompt_tokens, rec.completion_tokens) == ("seeded-1", "OK", 2, 9)


def test_complete_with_n_returns_every_completion(h, client):
    resp = client.complete(prompt_ids=[5, 6], max_tokens=2, n=2, seed=3, request_id="seeded-2", logprobs=True)
    assert [c.index for c in resp.completions] == [0, 1]
    assert [list(c.token_ids) for c in resp.completions] == [[101, 102], [102, 103]]
    assert [c.text for c in resp.completions] == ["de", "ef"]
    assert [list(c.logprobs) for c in resp.completions] == [[-0.5, -1.0]] * 2
    assert all(c.usage.completion_tokens == 2 and c.finish_reason == pb2.FINISH_REASON_LENGTH
               for c in resp.completions)
    # the top-level fields are completion 0's; usage counts every completion's tokens
    assert (resp.text, list(resp.token_ids), resp.request_id) == ("de", [101, 102], "seeded-2")
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (2, 4)
    one = client.complete(prompt_ids=[5, 6], max_tokens=2, n=1, seed=3, request_id="seeded-3")
    assert not one.completions and list(one.token_ids) == [101, 102]
    # unseeded: each completion its own random stream (no seed passed to any)
    client.complete(prompt_ids=[5, 6], max_tokens=2, n=2)
    assert [r.sampling.seed for r in h.engine.requests[-2:]] == [None, None]
    # the prompt counts once: its cache hits are completion 0's, each completion reports its own
    cached = client.complete(prompt_ids=[5, 6, 7, 8], max_tokens=2, n=2, request_id="cached-n")
    assert [c.usage.cached_prompt_tokens for c in cached.completions] == [3, 3]
    assert (cached.usage.prompt_tokens, cached.usage.cached_prompt_tokens, cached.usage.completion_tokens) == (4, 3, 4)
    assert h.wait_records(4)[-1].cached_prompt_tokens == 3


@pytest.mark.parametrize("method", ["generate", "complete"])
def test_n_completions_refused_before_any_token_when_one_is_shed(h, client, method):
    """Completion 0 is admitted and streams; completion 1 is shed: the call fails with
    RESOURCE_EXHAUSTED and its pushback, no chunk was sent, and completion 0's stream was closed."""
    with pytest.raises(grpc.RpcError) as ei:
        r = getattr(client, method)(prompt="hi", max_tokens=20, n=2, request_id="partial-1")
        got = list(r) if method == "generate" else [r]
        pytest.fail(f"no error; got {got}")
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after 250 ms" in ei.value.details()
    deadline = time.monotonic() + WAIT_S
    while "partial-1/0" not in h.engine.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "partial-1/0" in h.engine.closed
    assert h.wait_records(1)[0].status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("n", [-1, 17])
def test_n_out_of_range_is_invalid_argument(client, n):
    with pytest.raises(grpc.RpcError) as ei:
        client.complete(prompt="hi", max_tokens=2, n=n)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ei.value.details().startswith("n:")


def test_a_request_for_several_completions_is_not_resumed():
    req = build_request(prompt_ids=[5, 6], max_tokens=8, n=2)
    assert continuation(req, [98, 99]) is None
    assert continuation(build_request(prompt_ids=[5, 6], max_tokens=8, n=1), [98]).max_tokens == 7


@pytest.mark.parametrize("stream", [False, True])
def test_cli_n_completions(h, capsys, stream):
    argv = ["--target", h.target, "--prompt-ids", "5,6", "--max-tokens", "2", "--n", "2", "--seed", "3",
            "--request-id", "seeded-cli", *(["--stream"] if stream else [])]
    assert cli([*argv, "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert (obj["request_id"], obj["token_ids"], obj["text"]) == ("seeded-cli", [101, 102], "de")
    assert obj["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "cached_prompt_tokens": 0}
    assert [(c["index"], c["token_ids"], c["text"], c["finish_reason"]) for c in obj["completions"]] == [
        (0, [101, 102], "de", "length"), (1, [102, 103], "ef", "length")]
    assert cli(argv) == 0
    assert capsys.readouterr().out == "[0] de\n[1] ef\n"


# ---- the service without a transport ---------------------------------------------------

class Ctx:
    def __init__(self):
        self.code = self.details = None
        self.trailers = []

    def set_code(self, c): self.code = c
    def set_details(self, d): self.details = d
    def set_trailing_metadata(self, md): self.trailers = md


def test_service_direct_generate_raises_after_setting_status():
    async def go():
        svc = GenerateService(TOK, LIMITS, FakeEngine())
        ctx = Ctx()
        with pytest.raises(RpcAbort):
            async for _ in svc.generate(build_request("a", request_id="busy-2"), ctx):
                pass
        assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ctx.trailers[0] == ("grpc-retry-pushback-ms", "250")   # a list, as Ray wants
        from google.rpc import error_details_pb2, status_pb2
        key, raw = ctx.trailers[1]
        status = status_pb2.Status.FromString(raw)
        info = error_details_pb2.RetryInfo()
        assert key == "grpc-status-details-bin" and status.details[0].Unpack(info)
        assert info.retry_delay.ToMilliseconds() == 250
        # complete: empty reply with the status on the context; no context -> raises
        ctx2 = Ctx()
        assert await svc.complete(build_request("a", max_tokens=0), ctx2) == pb2.CompleteResponse()
        assert ctx2.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(RpcAbort):
            await svc.complete(build_request("a", max_tokens=0))
        assert svc.check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING
    asyncio.run(asyncio.wait_for(go(), WAIT_S))


def test_callback_failure_does_not_fail_request():
    def bad(_):
        raise RuntimeError("metrics down")

    async def go():
        svc = GenerateService(TOK, LIMITS, FakeEngine(), bad)
        return await svc.complete(build_request("a", max_tokens=2))
    assert asyncio.run(asyncio.wait_for(go(), WAIT_S)).text == "ab"


# ---- CLI --------------------------------------------------------------------------------

def cli(argv):
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    return run_generate(p.parse_args(argv))


def test_cli_json(h, capsys):
    rc = cli(["--target", h.target, "--prompt", "hi", "--max-tokens", "3", "--json",
              "--logprobs", "--request-id", "cli-1", "--temperature", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    obj = json.loads(out)                                   # exactly one JSON object
    assert obj == {"request_id": "cli-1", "token_ids": [98, 99, 100], "text": "abc",
                   "finish_reason": "length",
                   "usage": {"prompt_tokens": 3, "completion_tokens": 3, "cached_prompt_tokens": 0},
                   "logprobs": [-0.5, -1.0, -1.5]}


def test_cli_chat_messages_reach_validation(h, capsys):
    """--message ROLE TEXT builds a chat prompt; this server's tokenizer has no chat template, and
    says so naming the field (exit 2: the caller's to fix)."""
    rc = cli(["--target", h.target, "--message", "system", "be brief", "--message", "user", "hi"])
    assert rc == 2 and "INVALID_ARGUMENT: prompt.chat: this model has no chat template" in capsys.readouterr().err


def test_cli_stream_json_and_text(h, capsys):
    assert cli(["--target", h.target, "--prompt-ids", "1,2", "--max-tokens", "2",
                "--stream", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["text"] == "ab" and "logprobs" not in obj
    assert cli(["--target", h.target, "--prompt", "a", "--max-tokens", "3", "--stream"]) == 0
    assert capsys.readouterr().out == "abc\n"


def test_cli_stream_resumes_after_a_lost_replica(h, capsys):
    args = ["--target", h.target, "--prompt-ids", "5,6,7", "--max-tokens", "9", "--temperature", "0",
            "--stream", "--json"]
    assert cli(args + ["--request-id", "ctx-9"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert cli(args + ["--request-id", "lost-9"]) == 3                   # retryable, without --resume
    assert "error: UNAVAILABLE: the replica serving this request was lost" in capsys.readouterr().err
    assert cli(args + ["--request-id", "lost-9", "--resume", "1"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["token_ids"] == whole["token_ids"] and len(whole["token_ids"]) == 9
    assert resumed["text"] == whole["text"] and resumed["usage"] == whole["usage"]


@pytest.mark.parametrize("stream", [False, True])
def test_cli_top_logprobs_one_list_per_token(h, capsys, stream):
    assert cli(["--target", h.target, "--prompt", "a", "--max-tokens", "3", "--logprobs", "--top-logprobs", "2",
                "--request-id", "chunk-top", "--json"] + (["--stream"] if stream else [])) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["token_ids"] == [98, 99, 100] and obj["logprobs"] == [-0.5, -1.0, -1.5]
    assert obj["top_logprobs"] == [[{"token_id": t, "logprob": lp}, {"token_id": t + 1, "logprob": lp - 1}]
                                   for t, lp in zip(obj["token_ids"], obj["logprobs"])]
    assert h.engine.requests[-1].sampling.top_logprobs == 2


@pytest.mark.parametrize("stream", [False, True])
def test_cli_prompt_logprobs_come_once_for_the_prompt(h, capsys, stream):
    assert cli(["--target", h.target, "--prompt", "abcd", "--max-tokens", "3", "--prompt-logprobs", "2",
                "--request-id", "chunk-plp", "--json"] + (["--stream"] if stream else [])) == 0
    obj = json.loads(capsys.readouterr().out)
    n = obj["usage"]["prompt_tokens"]
    assert obj["prompt_logprobs"] == pytest.approx([-0.1 * j for j in range(1, n)])
    assert [[p["token_id"] for p in top] for top in obj["prompt_top_logprobs"]] == [[j, j + 1] for j in range(1, n)]
    assert h.engine.requests[-1].sampling.prompt_logprobs == 2
    assert cli(["--target", h.target, "--prompt", "abcd", "--max-tokens", "2", "--json"]) == 0
    assert "prompt_logprobs" not in json.loads(capsys.readouterr().out)


def test_prompt_logprobs_of_n_completions_come_once_from_completion_0(h, client):
    done = client.complete(build_request("abc", max_tokens=2, n=3, prompt_logprobs=0, request_id="plpn"))
    assert len(done.completions) == 3 and len(done.prompt_logprobs) == done.usage.prompt_tokens - 1
    assert not done.prompt_top_logprobs
    asked = {r.request_id: r.sampling.prompt_logprobs for r in h.engine.requests if r.request_id.startswith("plpn")}
    assert asked == {"plpn/0": 0, "plpn/1": None, "plpn/2": None}
    chunks = list(client.generate(build_request("abc", max_tokens=2, n=2, prompt_logprobs=1)))
    assert [len(c.prompt_logprobs) for c in chunks if c.prompt_logprobs] == [done.usage.prompt_tokens - 1]
    assert next(c for c in chunks if c.prompt_logprobs).index == 0


def test_cli_penalties_and_stops_reach_the_engine(h, capsys):
    assert cli(["--target", h.target, "--prompt", "a", "--max-tokens", "4", "--repetition-penalty", "1.5",
                "--presence-penalty", "0.25", "--frequency-penalty", "-0.5", "--min-tokens", "2",
                "--stop-token-ids", "13,14", "--logit-bias", "13=-100", "7=2.5", "--json"]) == 0
    s = h.engine.requests[-1].sampling
    assert s.logit_bias == ((7, 2.5), (13, -100.0))
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.min_tokens, s.stop_token_ids) == \
        (1.5, 0.25, -0.5, 2, (13, 14))


@pytest.mark.parametrize("argv,rc,needle", [
    (["--prompt", "a", "--max-tokens", "0"], 2, "error: INVALID_ARGUMENT: max_tokens:"),
    (["--prompt", "a", "--max-tokens", "2", "--min-tokens", "3"], 2,
     "error: INVALID_ARGUMENT: min_tokens: 3 exceeds max_tokens (2)"),
    (["--prompt", "a", "--presence-penalty", "3"], 2, "error: INVALID_ARGUMENT: presence_penalty:"),
    (["--prompt", "a", "--stop-token-ids", "1,x"], 2, "error: --stop-token-ids"),
    (["--prompt", "a", "--logit-bias", "13"], 2, "error: --logit-bias takes ID=BIAS"),
    (["--prompt", "a", "--logit-bias", "13=-101"], 2, "error: INVALID_ARGUMENT: logit_bias[13]:"),
    (["--prompt", "a", "--request-id", "busy-3"], 3, "error: RESOURCE_EXHAUSTED:"),
    (["--prompt", "a", "--request-id", "drain-3", "--stream"], 3, "error: UNAVAILABLE:"),
    (["--prompt", "a", "--request-id", "boom-3"], 1, "error: INTERNAL:"),
    (["--prompt-ids", "1,x"], 2, "error: --prompt-ids"),
])
def test_cli_errors(h, capsys, argv, rc, needle):
    assert cli(["--target", h.target] + argv) == rc
    assert needle in capsys.readouterr().err


# ---- codegen ----------------------------------------------------------------------------

def test_codegen_regenerates_when_proto_changes(tmp_path):
    from serving.api import codegen
    proto = tmp_path / "moe_serving.proto"
    proto.write_text(codegen.PROTO_FILE.read_text())
    gen = tmp_path / "gen"
    assert not codegen.is_up_to_date(proto, gen)
    codegen.generate_protos(proto_file=proto, gen_dir=gen)
    assert codegen.is_up_to_date(proto, gen)
    assert "from serving.api.gen import moe_serving_pb2" in (gen / "moe_serving_pb2_grpc.py").read_text()
    proto.write_text(proto.read_text() + "\n// changed\n")
    assert not codegen.is_up_to_date(proto, gen)
    codegen.generate_protos(proto_file=proto, gen_dir=gen)
    assert codegen.is_up_to_date(proto, gen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "moe_serving.proto"]
