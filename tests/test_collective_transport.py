"""The `collective` transport on a real 2-node local Ray cluster: shard actors in one gloo group.

Dispatch through it equals the local transport, shards land on distinct nodes, the engine's
greedy tokens do not change, a killed shard makes `run` raise within seconds (never hang) and
the next call rebuilds the group, a live rebalance reaches the shards, and `close` kills every
shard actor. The Ray Compiled Graphs candidate (serving/parallel/compiled_graph_transport.py) is
held to the same reference on the same cluster.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from serving.deployments.config import node_resource
from serving.deployments.worker_setup import worker_runtime_env
from serving.engine.engine import Engine
from serving.engine.request import GenerationRequest
from serving.engine.scheduler import SchedulerConfig
from serving.local_ray import local_ray_cluster
from serving.model.checkpoint import write_checkpoint
from serving.model.config import MoEConfig
from serving.model.model import MoEModel
from serving.model.sampling import SamplingParams
from serving.model.tokenizer import Tokenizer
from serving.parallel.collective_transport import CollectiveGroupError, CollectiveTransport
from serving.parallel.compiled_graph_transport import CompiledGraphTransport
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport, ShardCall
from serving.parallel.expert_shard import ExpertShardWorker
from serving.model.linear import packable_dtypes
from serving.parallel.placement import Placement

pytestmark = pytest.mark.cluster
NODES = 2


@pytest.fixture(scope="module")
def cluster():
    # as `moe-serve up` starts Ray: every worker runs the start-up boost first (startup_priority.py)
    with local_ray_cluster(NODES, runtime_env=worker_runtime_env()) as node_of:
        yield node_of


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("mixtral", "tiny", tmp_path_factory.mktemp("coll") / "ck")


def _resources(shards: int) -> list[dict[str, float]]:
    return [{node_resource(s % NODES): 0.001} for s in range(shards)]


def _transport(ckpt, shards: int, **kw) -> tuple[CollectiveTransport, Placement]:
    placement = Placement.build(MoEConfig.from_dir(ckpt), shards, "round_robin")
    return CollectiveTransport(str(ckpt), placement, shard_resources=_resources(shards), **kw), placement


def _local(ckpt, placement) -> LocalTransport:
    return LocalTransport([ExpertShardWorker.from_checkpoint(ckpt, placement, s)
                           for s in range(placement.num_shards)])


def _assert_killed(call) -> None:
    """`call()` returns an ObjectRef on an actor that was killed: ray.kill is asynchronous, so a call
    sent right after it may still be answered; poll (bounded) until the actor answers none."""
    import ray
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(call(), timeout=30)
            time.sleep(0.2)


def _routing(cfg: MoEConfig, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, cfg.hidden_size, generator=g)
    w_TK, ids_TK = torch.topk(torch.softmax(torch.randn(T, cfg.num_experts, generator=g), -1), cfg.top_k)
    return x_TD, ids_TK, w_TK


@pytest.fixture(scope="module")
def coll2(cluster, ckpt):
    transport, placement = _transport(ckpt, 2)
    yield transport, placement
    transport.close()


def test_dispatch_equals_local_on_distinct_nodes(cluster, ckpt, coll2):
    transport, placement = coll2
    assert [i["node_id"] for i in transport.shard_info] == [cluster[0], cluster[1]]
    cfg = MoEConfig.from_dir(ckpt)
    coll = ExpertDispatcher(placement, transport, cfg.num_experts)
    ref = ExpertDispatcher(placement, _local(ckpt, placement), cfg.num_experts)
    for seed, T in enumerate([1, 7, 64, 0, 4000]):   # 4000 x (64 x 4 + 2 x 12) B > 1 MiB: header, then payload
        for layer in cfg.moe_layer_ids:
            x, ids, w = _routing(cfg, T, seed)
            torch.testing.assert_close(coll(layer, x, ids, w), ref(layer, x, ids, w), rtol=1e-5, atol=1e-6)
    # two layers in flight at once (ping-pong micro-batches), completed in either order
    assert coll.overlaps
    (xa, ia, wa), (xb, ib, wb) = _routing(cfg, 5, 11), _routing(cfg, 9, 12)
    pa, pb = coll.submit(0, xa, ia, wa), coll.submit(1, xb, ib, wb)
    torch.testing.assert_close(pb.wait(), ref(1, xb, ib, wb), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pa.wait(), ref(0, xa, ia, wa), rtol=1e-5, atol=1e-6)
    # only the shard owning expert 0 is contacted: the other one gets no message at all
    x, _, w = _routing(cfg, 3, 9)
    ids = torch.tensor([[0, 2]] * 3)            # round_robin: experts 0, 2 on shard 0
    torch.testing.assert_close(coll(0, x, ids, w), ref(0, x, ids, w), rtol=1e-5, atol=1e-6)


def test_four_shards_on_two_nodes_bf16(cluster, ckpt):
    import ray
    transport, placement = _transport(ckpt, 4, dtype=torch.bfloat16, compute_nice=5, warm_rows=48)
    try:
        assert [i["node_id"] for i in transport.shard_info] == [cluster[s % 2] for s in range(4)]
        # the serving threads run ahead of Ray's workers (nice 15) where we may lower niceness (root)
        status = ray.get([a.status.remote() for a in transport.actors], timeout=30)
        assert [st["nice"] for st in status] == [5 if os.geteuid() == 0 else 15] * 4
        # each serving thread built its GEMM kernels first (when bf16 GEMMs are packed here): the
        # tiny experts' 2 shapes at each of the 36 row buckets up to 48
        packed = bool(packable_dtypes() & {torch.bfloat16})
        assert [st["kernel_warm_up"]["gemms"] for st in status] == [2 * 36 if packed else 0] * 4
        cfg = MoEConfig.from_dir(ckpt)
        coll = ExpertDispatcher(placement, transport, cfg.num_experts)
        ref = ExpertDispatcher(placement, LocalTransport(
            [ExpertShardWorker.from_checkpoint(ckpt, placement, s, torch.bfloat16) for s in range(4)]),
            cfg.num_experts)
        x, ids, w = _routing(cfg, 33, 5)
        x = x.bfloat16()
        got = coll(1, x, ids, w)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, ref(1, x, ids, w), rtol=1e-2, atol=1e-2)
        # each shard that computed reports the time it spent in forward (the rest of a call is waiting)
        busy = [st for st in ray.get([a.status.remote() for a in transport.actors], timeout=30) if st["calls"]]
        assert busy and all(st["forward_s"] > 0 for st in busy)
        # a shard whose forward raises drops its side of the group: run raises at once, naming it
        bad = ShardCall(3, x[:2], torch.full((2, cfg.top_k), -1), w[:2])    # bincount rejects ids < 0
        t0 = time.monotonic()
        with pytest.raises(CollectiveGroupError, match="shard 3 stopped serving: RuntimeError"):
            transport.run(1, [bad])
        assert time.monotonic() - t0 < 10
    finally:
        transport.close()


def _greedy(ckpt, transport, placement) -> list[list[int]]:
    model = MoEModel.from_checkpoint(ckpt)
    engine = Engine(model, ExpertDispatcher(placement, transport, model.config.num_experts),
                    Tokenizer.from_dir(ckpt),
                    SchedulerConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=256),
                    ping_pong=True)        # micro-batches where the transport overlaps (collective)
    prompts = [[5, 17, 300, 42], [9] * 11, [700]]
    events = {i: [] for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        engine.add_request(GenerationRequest(request_id=str(i), prompt_token_ids=tuple(ids),
                                             sampling=SamplingParams(temperature=0.0, max_tokens=12,
                                                                     ignore_eos=True)),
                           events[i].append)
    while engine.has_work():
        engine.step()
    return [[ev.token_id for ev in events[i]] for i in range(len(prompts))]


def test_engine_greedy_tokens_equal_local(ckpt, coll2):
    transport, placement = coll2
    busy_before = transport.busy_seconds()
    got = _greedy(ckpt, transport, placement)
    busy = transport.busy_seconds()        # each shard's compute time, asked through Ray
    assert set(busy) == {0, 1} and all(busy[s] > busy_before.get(s, 0.0) for s in (0, 1)), (busy_before, busy)
    assert got == _greedy(ckpt, _local(ckpt, placement), placement)
    assert all(len(t) == 12 for t in got)


def test_killed_shard_raises_fast_then_group_rebuilds(cluster, ckpt, coll2):
    import ray
    transport, placement = coll2
    cfg = MoEConfig.from_dir(ckpt)
    coll = ExpertDispatcher(placement, transport, cfg.num_experts)
    x, ids, w = _routing(cfg, 16, 3)
    before = coll(0, x, ids, w)
    busy_before = transport.busy_seconds()
    victim, survivor = transport.actors
    ray.kill(victim, no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(CollectiveGroupError, match="shard 0"):
        for _ in range(50):                 # the kill lands within a call or two
            coll(0, x, ids, w)
            time.sleep(0.05)
    assert time.monotonic() - t0 < 10
    _assert_killed(survivor.status.remote)          # the survivor is killed with the group
    torch.testing.assert_close(coll(0, x, ids, w), before)   # next call: a new group, same output
    assert transport.generation == 2
    busy_after = transport.busy_seconds()           # the old gang's time is kept: never goes back
    assert all(busy_after[s] >= busy_before[s] for s in busy_before), (busy_before, busy_after)
    assert [i["node_id"] for i in transport.shard_info] == [cluster[0], cluster[1]]


def test_live_rebalance_loads_new_experts_and_drops_old(ckpt, coll2):
    import ray
    transport, _ = coll2
    cfg = MoEConfig.from_dir(ckpt)
    new = Placement.build(cfg, 2, "contiguous")     # from round_robin: experts 1 and 2 change shard
    coll = ExpertDispatcher(new, transport, cfg.num_experts)
    ref = ExpertDispatcher(new, _local(ckpt, new), cfg.num_experts)
    transport.set_placement(new, retain_after_s=0.0)
    x, ids, w = _routing(cfg, 32, 11)
    for layer in cfg.moe_layer_ids:
        torch.testing.assert_close(coll(layer, x, ids, w), ref(layer, x, ids, w), rtol=1e-5, atol=1e-6)
    deadline = time.monotonic() + 10
    while True:
        held = [ray.get(a.describe.remote(), timeout=30)["experts"] for a in transport.actors]
        if all(set(held[s][layer]) <= set(new.experts_of(s)[layer]) for s in range(2) for layer in held[s]):
            break
        assert time.monotonic() < deadline, held
        time.sleep(0.2)


def test_close_kills_every_shard_actor(coll2):
    transport, _ = coll2
    actors = list(transport.actors)
    transport.close()
    transport.close()                           # idempotent
    assert transport.actors == []
    for a in actors:
        _assert_killed(a.status.remote)


def test_engine_hosted_shard_computes_in_this_process_beside_remote_ranks(cluster, ckpt):
    """`local_shards`: shard 0 lives in the engine's process (an EP rank itself) and shards 1, 2 are
    actors, ranks 1 and 2: the output equals the local transport's, one or two layers in flight;
    the local shard computes on `local_threads` threads and reports its busy time; a killed remote
    shard breaks the group naming it, and the rebuild serves the same output."""
    import ray
    with pytest.raises(ValueError, match="not all"):
        _transport(ckpt, 2, local_shards=(0, 1))
    transport, placement = _transport(ckpt, 3, local_shards=(0,), local_threads=1, warm_rows=8)
    try:
        info = transport.shard_info
        assert [(i["shard_id"], i["in_engine"], i["node_id"]) for i in info] == [
            (0, True, cluster[0]), (1, False, cluster[1]), (2, False, cluster[0])]
        assert info[0]["pid"] == os.getpid() and os.getpid() not in {info[1]["pid"], info[2]["pid"]}
        assert info[0]["experts"] == {layer: list(e) for layer, e in placement.experts_of(0).items()}
        assert len(transport.actors) == 2
        # the local shard's kernels are warmed as they run: on local_threads threads
        warm = transport.warm_targets(8)
        assert warm and len(warm) == 2 * sum(len(e) for e in placement.experts_of(0).values())
        assert {t.call.threads for t in warm} == {1}
        cfg = MoEConfig.from_dir(ckpt)
        coll = ExpertDispatcher(placement, transport, cfg.num_experts)
        ref = ExpertDispatcher(placement, _local(ckpt, placement), cfg.num_experts)
        seen_threads = []
        forward = transport.workers[0].forward
        transport.workers[0].forward = lambda *a: (seen_threads.append(torch.get_num_threads()), forward(*a))[1]
        torch.set_num_threads(2)
        try:
            for seed, T in enumerate([1, 7, 64, 0]):
                for layer in cfg.moe_layer_ids:
                    x, ids, w = _routing(cfg, T, seed)
                    torch.testing.assert_close(coll(layer, x, ids, w), ref(layer, x, ids, w), rtol=1e-5, atol=1e-6)
            assert torch.get_num_threads() == 2        # the caller's count, back
        finally:
            transport.workers[0].forward = forward
            torch.set_num_threads(1)
        assert seen_threads and set(seen_threads) == {1}
        (xa, ia, wa), (xb, ib, wb) = _routing(cfg, 5, 11), _routing(cfg, 9, 12)
        pa, pb = coll.submit(0, xa, ia, wa), coll.submit(1, xb, ib, wb)
        torch.testing.assert_close(pb.wait(), ref(1, xb, ib, wb), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pa.wait(), ref(0, xa, ia, wa), rtol=1e-5, atol=1e-6)
        busy = transport.busy_seconds()
        assert set(busy) == {0, 1, 2} and all(v > 0 for v in busy.values()), busy
        # the local shard fails one layer: its error is raised once the remote answers are in, so
        # the next layer's answers are its own (nothing left in flight to land in its buffers)
        def broken(*a):
            raise RuntimeError("local shard bug")
        transport.workers[0].forward = broken
        x, ids, w = _routing(cfg, 12, 21)
        with pytest.raises(RuntimeError, match="local shard bug"):
            coll(1, x, ids, w)
        transport.workers[0].forward = forward
        x2, ids2, w2 = _routing(cfg, 10, 22)
        torch.testing.assert_close(coll(1, x2, ids2, w2), ref(1, x2, ids2, w2), rtol=1e-5, atol=1e-6)
        assert transport.generation == 1                 # the group did not need rebuilding
        assert _greedy(ckpt, transport, placement) == _greedy(ckpt, _local(ckpt, placement), placement)
        # a remote shard dies: the error names it, the next call rebuilds the gang around shard 0
        x, ids, w = _routing(cfg, 16, 3)
        before = coll(0, x, ids, w)
        ray.kill(transport.actors[1], no_restart=True)            # shard 2
        with pytest.raises(CollectiveGroupError, match="shard 2"):
            for _ in range(50):
                coll(0, x, ids, w)
                time.sleep(0.05)
        torch.testing.assert_close(coll(0, x, ids, w), before)
        assert transport.generation == 2 and len(transport.actors) == 2
        assert transport.busy_seconds()[0] >= busy[0]
        # a live rebalance reaches the engine's own shard too: it loads what it newly serves, on
        # first use, and drops what it no longer does
        new = Placement.build(cfg, 3, "contiguous")
        transport.set_placement(new, retain_after_s=0.0)
        coll_new = ExpertDispatcher(new, transport, cfg.num_experts)
        ref_new = ExpertDispatcher(new, _local(ckpt, new), cfg.num_experts)
        x, ids, w = _routing(cfg, 32, 23)
        for layer in cfg.moe_layer_ids:
            torch.testing.assert_close(coll_new(layer, x, ids, w), ref_new(layer, x, ids, w), rtol=1e-5, atol=1e-6)
        deadline = time.monotonic() + 10
        # round_robin gave shard 0 experts 0, 3; contiguous gives it 0, 1 (32 tokens reach every expert)
        while {layer: tuple(e) for layer, e in transport.workers[0].expert_ids().items()} != new.experts_of(0):
            assert time.monotonic() < deadline, transport.workers[0].expert_ids()
            time.sleep(0.05)
    finally:
        transport.close()
    assert transport.actors == []


def test_compiled_graph_dispatch_equals_local_and_close_kills_the_shards(cluster, ckpt):
    cfg = MoEConfig.from_dir(ckpt)
    placement = Placement.build(cfg, 2, "round_robin")
    transport = CompiledGraphTransport(str(ckpt), placement, torch.float32, _resources(2))
    try:
        graph = ExpertDispatcher(placement, transport, cfg.num_experts)
        ref = ExpertDispatcher(placement, _local(ckpt, placement), cfg.num_experts)
        for seed, T in enumerate([1, 7, 64]):
            for layer in cfg.moe_layer_ids:
                x, ids, w = _routing(cfg, T, seed)
                torch.testing.assert_close(graph(layer, x, ids, w), ref(layer, x, ids, w), rtol=1e-5, atol=1e-6)
        x, _, w = _routing(cfg, 3, 9)
        ids = torch.tensor([[0, 2]] * 3)            # round_robin: experts 0, 2 on shard 0, shard 1 gets None
        torch.testing.assert_close(graph(0, x, ids, w), ref(0, x, ids, w), rtol=1e-5, atol=1e-6)
    finally:
        actors = list(transport.actors)
        transport.close()
    for a in actors:                                # a killed actor answers no call
        _assert_killed(a.__ray_ready__.remote)
