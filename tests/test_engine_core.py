"""The engine core in a process of its own (serving/deployments/engine_core.py), without Ray: the
plain CoreProcess object serves a RemoteCore over a real Unix socket, as the core actor does for its
replica. The Ray actor around it runs in the cluster tests (engine_process is the default)."""
from __future__ import annotations

import asyncio
import os
import socket
from multiprocessing.connection import Client

import grpc
import pytest

from serving.api.service import _failure_for
from serving.deployments.config import AppConfig
from serving.deployments.engine_core import CoreProcess, LocalCore, RemoteCore
from serving.engine.async_engine import EngineCoreLost
from serving.engine.request import FinishReason, GenerationRequest
from serving.model.checkpoint import write_checkpoint
from serving.model.config import MoEConfig
from serving.model.sampling import SamplingParams
from serving.parallel.placement import Placement

WAIT_S = 30.0


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_checkpoint("mixtral", "tiny", tmp_path_factory.mktemp("ckpt"), seed=0)


def _cfg(checkpoint) -> AppConfig:
    return AppConfig(checkpoint=str(checkpoint), expert_shards=2, transport="local", max_num_seqs=4,
                     max_model_len=64, compute_nice=None)


def _placement(checkpoint) -> str:
    return Placement.build(MoEConfig.from_dir(checkpoint), 2, "contiguous").to_json()


@pytest.fixture
def pair(tiny_checkpoint):
    """A CoreProcess and the RemoteCore connected to it, as the replica holds it."""
    core = CoreProcess(_cfg(tiny_checkpoint).to_args(), _placement(tiny_checkpoint), [])
    core.warm_up()
    address, key = core.address()
    remote = RemoteCore(actor=None, conn=Client(address, "AF_UNIX", authkey=key))
    yield core, remote
    remote._conn.close()
    core.shutdown()


def _req(rid: str, prompt=(5, 6, 7, 8), max_tokens: int = 6) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt),
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def _collect(stream) -> list:
    return [chunk async for chunk in stream]


def test_streams_through_the_core_process_match_the_in_process_core(pair, tiny_checkpoint):
    core, remote = pair
    local = LocalCore(_cfg(tiny_checkpoint), _placement(tiny_checkpoint), [])
    local.warm_up()
    try:
        async def both():
            reqs = [_req(f"r{i}", prompt=(5 + i, 6, 7, 8 + i)) for i in range(3)]
            over_socket = await asyncio.wait_for(asyncio.gather(
                *[_collect(remote.stream_chunks(r, 2, 10.0)) for r in reqs]), WAIT_S)
            in_process = await asyncio.wait_for(asyncio.gather(
                *[_collect(local.stream_chunks(r, 2, 10.0)) for r in reqs]), WAIT_S)
            return over_socket, in_process
        over_socket, in_process = asyncio.run(both())
    finally:
        local.shutdown()
    for chunks, expected in zip(over_socket, in_process):
        assert [len(c) for c in chunks] == [1, 2, 2, 1]               # the first token alone, then pairs
        events = [ev for c in chunks for ev in c]
        assert [ev.token_id for ev in events] == [ev.token_id for c in expected for ev in c]
        assert [ev.completion_tokens for ev in events] == [1, 2, 3, 4, 5, 6]
        assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].prompt_tokens == 4
    # the replica's mirror of the engine's load, carried with every step's events
    assert remote.num_running() == 0 and remote.num_waiting() == 0
    assert 0 < len(remote.recent_step_seconds()) <= 9 and all(s > 0 for s in remote.recent_step_seconds())
    assert remote.alive


def test_a_stream_the_replica_drops_is_aborted_in_the_core(pair):
    core, remote = pair
    before = core.core.engine.stats.cancelled_total

    async def drop_after_first():
        stream = remote.stream_chunks(_req("long", max_tokens=40), 1, 10.0)
        first = await asyncio.wait_for(stream.__anext__(), WAIT_S)
        await stream.aclose()
        return first
    first = asyncio.run(drop_after_first())
    assert first[0].token_id >= 0
    for _ in range(200):                               # the core frees the slot at its next step
        if core.core.engine.stats.cancelled_total > before and core.core.engine.stats.num_running == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert core.core.engine.stats.cancelled_total == before + 1
    assert core.core.engine.stats.num_running == 0


def test_a_request_the_engine_rejects_fails_its_stream(pair):
    _, remote = pair

    async def run():
        return await asyncio.wait_for(_collect(remote.stream(_req("big", prompt=range(1, 60), max_tokens=30))),
                                      WAIT_S)
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(run())
    assert remote.alive                                # one bad request does not end the core


def test_streams_in_flight_end_with_engine_core_lost_when_the_core_goes(pair):
    core, remote = pair

    async def run():
        stream = remote.stream(_req("doomed", max_tokens=40))
        await asyncio.wait_for(stream.__anext__(), WAIT_S)
        # the core's side of the socket goes away, as when its process dies (a plain close would not
        # wake the core's reader thread, blocked in recv on it)
        dup = socket.socket(fileno=os.dup(core._conn.fileno()))
        dup.shutdown(socket.SHUT_RDWR)
        dup.close()
        with pytest.raises(EngineCoreLost, match="died"):
            await asyncio.wait_for(_collect(stream), WAIT_S)
        with pytest.raises(EngineCoreLost):            # and later requests fail at once
            await asyncio.wait_for(_collect(remote.stream(_req("after"))), WAIT_S)
    asyncio.run(run())
    assert not remote.alive


def test_engine_core_lost_is_unavailable_with_a_retry_delay():
    failure = _failure_for(EngineCoreLost("the engine core process died (EOFError)"), "r1")
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert "retry after" in failure.details and "died" in failure.details
    assert failure.trailers


def test_events_cross_the_core_process_socket_with_every_field():
    from serving.deployments.engine_core import _pack, _unpack
    from serving.engine.request import TokenEvent
    ev = TokenEvent(request_id="r", token_id=7, text_delta="x", logprob=-0.25, finish_reason=FinishReason.STOP,
                    prompt_tokens=40, completion_tokens=3, cached_tokens=32,
                    top_logprobs=((7, 9), (-0.25, -1.5)), prompt_logprobs=(-3.0, -1.25),
                    prompt_top_logprobs=(((4,), (-0.5,)), ((6,), (-0.75,))))
    assert _unpack("r", _pack(ev)) == ev
    err = RuntimeError("step failed")
    assert _unpack("r", _pack(err)) is err
