"""Prefix-affinity routing: the pure policy (serving/routing/prefix_affinity.py) and the Serve
router's prompt extraction (serving/routing/ray_router.py). The router against a real cluster:
tests/test_cluster_routing.py."""
from __future__ import annotations

import asyncio
import pickle
import random

import pytest
from ray.serve._private.common import DeploymentID, gRPCRequest
from ray.serve.request_router import ReplicaID, RunningReplica

from serving.api.kserve import pack_bytes
from serving.api.kserve_protos import kserve
from serving.api.protos import pb2
from serving.engine.request import GenerationRequest
from serving.model.sampling import SamplingParams
from serving.routing.prefix_affinity import AffinityConfig, PrefixAffinity, prompt_blocks
from serving.routing.ray_router import request_prompt

CFG = AffinityConfig(block_tokens=4, block_chars=8, load_cost_tokens=8)   # a request in flight = 2 blocks


def test_blocks_are_whole_blocks_chained_on_everything_before_them():
    a = prompt_blocks(list(range(10)), CFG)
    assert len(a) == 2                                        # 10 ids: 2 whole blocks of 4, the rest uncacheable
    assert prompt_blocks(list(range(8)) + [99], CFG) == a     # the same first 8 ids
    b = prompt_blocks([7, 1, 2, 3, 4, 5, 6, 7], CFG)
    assert b[0] != a[0] and b[1] != a[1]                      # block 1 equal, its history not: a different block
    assert prompt_blocks(list(range(8)), CFG, salt="tenant-a") != a
    assert len(prompt_blocks("x" * 17, CFG)) == 2             # text: blocks of 8 characters
    assert prompt_blocks([1, 2, 3], CFG) == [] and prompt_blocks("short", CFG) == []


def test_a_prompt_goes_where_its_longest_prefix_was_routed():
    aff = PrefixAffinity(CFG)
    conv = list(range(100, 124))                              # 6 blocks
    other = list(range(500, 516))
    assert aff.rank(prompt_blocks(conv, CFG), {"r0": 0, "r1": 0}) is None   # never seen: load decides
    aff.record(prompt_blocks(conv[:12], CFG), "r1")           # turn 1 went to r1 (3 blocks)
    aff.record(prompt_blocks(other, CFG), "r0")
    assert aff.match(prompt_blocks(conv, CFG), "r1") == 3
    # cost = blocks to prefill + 2 per request in flight: r1 3 + 0, r0 6 + 0
    assert aff.rank(prompt_blocks(conv, CFG), {"r0": 0, "r1": 0}) == [["r1"], ["r0"]]
    aff.record(prompt_blocks(conv[:4], CFG), "r0")            # r0 holds 1 block of it: r1's 3 still win
    assert aff.rank(prompt_blocks(conv, CFG), {"r0": 0, "r1": 0, "r2": 0}) == [["r1"], ["r0"], ["r2"]]


def test_load_weighs_against_the_blocks_a_replica_would_prefill():
    aff = PrefixAffinity(CFG)
    blocks = prompt_blocks(list(range(16)), CFG)               # 4 blocks, all on r0
    aff.record(blocks, "r0")
    assert aff.rank(blocks, {"r0": 1, "r1": 0}) == [["r0"], ["r1"]]      # 0 + 2 against 4 + 0
    assert aff.rank(blocks, {"r0": 2, "r1": 0}) == [["r0"], ["r1"]]      # 4 against 4: the holder first
    assert aff.rank(blocks, {"r0": 3, "r1": 0}) == [["r1"], ["r0"]]      # 6 against 4: load wins
    assert aff.rank(blocks, {"r0": None, "r1": None}) == [["r0"], ["r1"]]  # unknown load counts as 0
    aff.record(blocks, "r1")                                              # the overflow went to r1
    assert aff.rank(blocks, {"r0": 3, "r1": 0}) == [["r1"], ["r0"]]
    assert aff.rank(blocks, {"r0": 0, "r1": 0}) == [["r0", "r1"]]        # both hold it: by load alone
    longer = prompt_blocks(list(range(16)) + list(range(900, 916)), CFG)  # 8 blocks, all on r0
    aff.record(longer, "r0")
    assert aff.rank(longer, {"r0": 3, "r2": 0}) == [["r0"], ["r2"]]      # 6 against 8: a long history stays


def test_a_next_turn_stays_home_while_its_last_turn_is_still_counted_in_flight():
    """The caller's in-flight count of the home replica can still include the turn that just
    finished there (Serve decrements it in a done-callback that races the client's next request).
    Turn 2: 3 blocks, 2 of them at home; home costs 1 + 2 (the stale count) against 3 + 0."""
    aff = PrefixAffinity(CFG)
    turn1 = list(range(200, 209))                                        # 2 blocks and a partial one
    aff.record(prompt_blocks(turn1, CFG), "r0")
    turn2 = prompt_blocks(turn1 + list(range(700, 704)), CFG)            # 3 blocks
    assert aff.rank(turn2, {"r0": 1, "r1": 0}) == [["r0"], ["r1"]]
def test_memory_is_bounded_per_replica_and_forgets_replicas_that_left():
    aff = PrefixAffinity(AffinityConfig(block_tokens=4, max_blocks_per_replica=3))
    first = prompt_blocks(list(range(8)), aff.cfg)
    aff.record(first, "r0")
    aff.record(prompt_blocks(list(range(50, 58)), aff.cfg), "r0")        # 2 more: the oldest block goes
    assert aff.blocks_held("r0") == 3
    assert aff.match(first, "r0") == 0                                    # block 0 dropped: the chain breaks
    aff.record(first, "r1")
    aff.keep_only({"r1"})
    assert aff.blocks_held("r0") == 0 and aff.match(first, "r1") == 2
    aff.forget("r1")
    assert aff.rank(first, {"r1": 0, "r2": 0}) is None


@pytest.mark.parametrize("field,value", [("block_tokens", 0), ("block_chars", 0), ("max_blocks_per_replica", 0),
                                         ("load_cost_tokens", -1)])
def test_config_rejects_sizes_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        AffinityConfig(**{field: value})


def test_the_router_reads_the_prompt_of_each_request_shape():
    text = pb2.GenerateRequest(text="You are a helpful assistant.", max_tokens=4)
    ids = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[1, 2, 3]))
    assert request_prompt(pickle.dumps(gRPCRequest(user_request_proto=text))) == ("You are a helpful assistant.", "")
    assert request_prompt(pickle.dumps(gRPCRequest(user_request_proto=ids))) == ((1, 2, 3), "")
    chat = pb2.GenerateRequest(chat=pb2.ChatMessages(messages=[pb2.ChatMessage(role="system", content="Be brief."),
                                                               pb2.ChatMessage(role="user", content="Hi")]))
    key, _ = request_prompt(pickle.dumps(gRPCRequest(user_request_proto=chat)))
    chat.chat.messages.add(role="assistant", content="Hello")              # the next turn extends the key
    assert request_prompt(pickle.dumps(gRPCRequest(user_request_proto=chat)))[0].startswith(key)
    assert "Be brief." in key and "Hi" in key
    gen = GenerationRequest(request_id="r", prompt_token_ids=(5, 6), sampling=SamplingParams(), cache_salt="t1")
    assert request_prompt(gen) == ((5, 6), "t1")                           # through a handle: the salt too
    infer = kserve.ModelInferRequest(model_name="m", inputs=[kserve.ModelInferRequest.InferInputTensor(
        name="text_input", datatype="BYTES", shape=[1],
        contents=kserve.InferTensorContents(bytes_contents=["héllo".encode()]))])
    as_proxy_sends = pickle.dumps(gRPCRequest(user_request_proto=infer.SerializeToString()))   # KServe: bytes
    assert request_prompt(as_proxy_sends, "ModelInfer") == ("héllo", "")
    assert request_prompt(as_proxy_sends, "ModelStreamInfer") == ("héllo", "")
    raw = kserve.ModelInferRequest(model_name="m", raw_input_contents=[pack_bytes(["raw prompt".encode()])],
                                   inputs=[kserve.ModelInferRequest.InferInputTensor(
                                       name="text_input", datatype="BYTES", shape=[1])])
    assert request_prompt(pickle.dumps(gRPCRequest(user_request_proto=raw.SerializeToString())),
                          "ModelInfer") == ("raw prompt", "")
    assert request_prompt(pickle.dumps(gRPCRequest(user_request_proto=b"")), "ServerLive") is None
    assert request_prompt(pickle.dumps(gRPCRequest(user_request_proto=b"\xff\x00junk")), "ModelInfer") is None
    assert request_prompt(pickle.dumps(gRPCRequest(user_request_proto=pb2.GenerateRequest()))) is None
    assert request_prompt(b"not a pickle") is None
    tokenize = pb2.TokenizeRequest(text="a prompt, but nothing will be cached")       # routed by load
    assert request_prompt(pickle.dumps(gRPCRequest(user_request_proto=tokenize)), "Tokenize") is None


# -- the Serve router itself, driven through Serve's own routing loop (RequestRouter
#    ._choose_replica_for_request) with in-memory replicas

DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="moe")


class FakeReplica(RunningReplica):
    """A replica as the router sees one: an id and a queue length it answers probes with (after
    probe_delays_s[i] seconds for the i-th probe, where given)."""

    def __init__(self, name: str, queue_len: int = 0):
        self._id, self.queue_len = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT), queue_len
        self.probe_delays_s: list[float] = []
        self.probes = 0

    replica_id = property(lambda self: self._id)
    node_id = property(lambda self: "")
    availability_zone = property(lambda self: None)
    multiplexed_model_ids = property(lambda self: set())
    max_ongoing_requests = property(lambda self: 100)
    is_cross_language = property(lambda self: False)

    def update_replica_info(self, replica_info) -> None:
        pass

    def push_proxy_handle(self, handle) -> None:
        pass

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes += 1
        if self.probe_delays_s:
            await asyncio.sleep(self.probe_delays_s.pop(0))
        return self.queue_len

    def try_send_request(self, pr, with_rejection: bool):
        raise NotImplementedError("the test routes only")


def _router(**kwargs):
    from ray.serve._private.common import DeploymentHandleSource
    from serving.routing.ray_router import PrefixAffinityRouter
    router = PrefixAffinityRouter(deployment_id=DEPLOYMENT,
                                  handle_source=DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=True)
    router.initialize_state(**kwargs)
    return router


def _pending(n: int, prompt_ids: list[int]):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest
    proto = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=prompt_ids), max_tokens=4)
    return PendingRequest(args=[pickle.dumps(gRPCRequest(user_request_proto=proto))], kwargs={},
                          metadata=RequestMetadata(request_id=f"r{n}", internal_request_id=f"i{n}",
                                                   call_method="Generate", is_streaming=True))


async def _route(router, pending, complete: bool = True):
    """What Serve's Router does: choose, then (the replica accepted) on_request_routed, and once
    the request is done on_request_completed (not yet with complete=False: it stays in flight)."""
    replica = await asyncio.wait_for(router._choose_replica_for_request(pending), timeout=10)
    router.on_send_request(replica.replica_id)
    router.on_request_routed(pending, replica.replica_id, None)
    if complete:
        router.on_request_completed(replica.replica_id, pending.metadata.internal_request_id)
    return replica.replica_id.unique_id


def test_serve_router_keeps_each_conversation_on_one_replica_and_yields_to_load():
    asyncio.run(_conversations_stay_home())


async def _conversations_stay_home():
    router = _router(block_tokens=16, load_cost_tokens=16)    # a request in flight weighs one block
    replicas = [FakeReplica(f"replica-{i}") for i in range(3)]
    router.update_replicas(replicas)
    rng, n = random.Random(0), 0
    conversations = {c: [rng.randrange(1000) for _ in range(40)] for c in range(6)}
    homes: dict[int, str] = {}
    for turn in range(4):                        # each turn's prompt = the previous one + 24 more ids
        for c, ids in conversations.items():
            n += 1
            got = await _route(router, _pending(n, ids))
            assert homes.setdefault(c, got) == got, f"conversation {c} turn {turn} moved {homes[c]} -> {got}"
            ids.extend(rng.randrange(1000) for _ in range(24))
    assert len(set(homes.values())) > 1          # new conversations were spread by load
    # Serve's queue-length cache says nothing here: a stale count there (a replica's burst that
    # finished) does not move a conversation; the load is this router's own requests in flight
    home = next(r for r in replicas if r.replica_id.unique_id == homes[0])
    router.on_new_queue_len_info(home.replica_id, 50)
    n += 1
    assert await _route(router, _pending(n, conversations[0])) == homes[0]

    async def busy(k: int) -> None:             # k more requests in flight at home (other prompts)
        nonlocal n
        for _ in range(k):
            n += 1
            router.on_request_routed(_pending(n, [rng.randrange(1000) for _ in range(8)]), home.replica_id, None)

    # conversation 0's next prompt: 8 blocks, all at home now. Home with 7 requests in flight costs
    # 0 + 7 against 8 elsewhere: it stays; with 8 (0 + 8 against 8: a tie goes to the holder) it
    # stays; with 9 it goes elsewhere
    await busy(7)
    n += 1
    assert await _route(router, _pending(n, conversations[0])) == homes[0]
    await busy(1)
    n += 1
    assert await _route(router, _pending(n, conversations[0])) == homes[0]
    await busy(1)
    n += 1
    away = await _route(router, _pending(n, conversations[0]))
    assert away != homes[0]
    for i in range(n - 12, n + 1):              # they finish: home is idle again; both hold the
        router.on_request_completed(home.replica_id, f"i{i}")       # conversation now, so load decides
    other = next(r for r in replicas if r.replica_id.unique_id == away)
    n += 1
    router.on_request_routed(_pending(n, [1, 2, 3]), other.replica_id, None)
    n += 1
    assert await _route(router, _pending(n, conversations[0])) == homes[0]
    # a replica that left is forgotten: the conversation goes where it went last (not the gone one)
    router.update_replicas([r for r in replicas if r is not home])
    assert router.affinity.blocks_held(home.replica_id) == 0


def test_a_replica_slow_to_answer_a_probe_keeps_its_conversations_until_it_stops_answering():
    asyncio.run(_slow_probe())


async def _slow_probe():
    """Serve probes a replica whose queue length it has no fresh entry for, with a 0.1 s deadline,
    and passes one that misses it over for the next group at once. Ray's own router would send the
    turn to the replica without its history; this one offers only the cheapest group twice (the
    second probe's deadline is 0.2 s), then the full ranking."""
    router = _router(block_tokens=16, load_cost_tokens=16)
    home, other = FakeReplica("replica-0"), FakeReplica("replica-1")
    router.update_replicas([home, other])
    await asyncio.sleep(0.05)                    # the new replicas' first probes
    ids = list(range(100, 164))                  # 4 blocks
    router.affinity.record(prompt_blocks(ids, router.affinity.cfg), home.replica_id)

    router.replica_queue_len_cache.invalidate_key(home.replica_id)    # its entry went stale
    home.probe_delays_s, home.probes = [0.15], 0                       # busy in a step: misses 0.1 s
    assert await _route(router, _pending(1, ids)) == "replica-0"
    assert home.probes == 2                      # the second probe, with 0.2 s, found it
    assert not router._rankings and not router._blocks

    router.replica_queue_len_cache.invalidate_key(home.replica_id)    # it stops answering
    home.probe_delays_s, home.probes = [5.0] * 10, 0
    assert await _route(router, _pending(2, ids)) == "replica-1"
    assert home.probes == 3                      # 0.1 s, 0.2 s, then 0.4 s with the other group behind


def test_a_completion_reported_before_its_routing_leaves_nothing_in_flight(monkeypatch):
    asyncio.run(_completed_first(monkeypatch))


async def _completed_first(monkeypatch):
    """Over Serve's gRPC data path a unary call's acceptance arrives with its response, so Serve
    reports the request completed before it reports it routed (ray_router module doc), and its own
    queue-length cache keeps the request counted. A burst served that way must not leave the replica
    looking busy: the next turn of the conversation it holds goes back to it."""
    import serving.routing.ray_router as ray_router
    router = _router(block_tokens=16, load_cost_tokens=16)
    home, other = FakeReplica("replica-0"), FakeReplica("replica-1")
    router.update_replicas([home, other])
    await asyncio.sleep(0.05)                    # the new replicas' first probes
    ids = list(range(100, 164))                  # 4 blocks, held at home
    router.affinity.record(prompt_blocks(ids, router.affinity.cfg), home.replica_id)
    rng = random.Random(1)
    for n in range(12):                          # the burst: each call's completion comes first
        router.on_request_completed(home.replica_id, f"i{n}")
        router.on_request_routed(_pending(n, [rng.randrange(1000) for _ in range(8)]), home.replica_id, None)
    assert not router._in_flight.get(home.replica_id) and not router._completed_first
    router.on_new_queue_len_info(home.replica_id, 12)       # Serve's cache: the burst still counted
    assert await _route(router, _pending(20, ids)) == "replica-0"      # 0 in flight + 0 blocks < 0 + 4

    # a completion for a request never routed there (rejected, then taken by the other replica):
    # the other replica counts it until it completes there
    router.on_request_completed(home.replica_id, "i30")
    router.on_request_routed(_pending(30, [1, 2, 3]), other.replica_id, None)
    assert router._in_flight[other.replica_id] == {"i30"}
    router.on_request_completed(other.replica_id, "i30")
    assert not router._in_flight[other.replica_id]
    # completions of requests never routed are remembered up to MAX_PENDING, oldest dropped first
    monkeypatch.setattr(ray_router, "MAX_PENDING", 4)
    for n in range(40, 50):
        router.on_request_completed(home.replica_id, f"i{n}")
    assert [k for _, k in router._completed_first] == ["i46", "i47", "i48", "i49"]
