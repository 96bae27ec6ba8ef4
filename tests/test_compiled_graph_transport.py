"""The Ray Compiled Graphs transport candidate (serving/parallel/compiled_graph_transport.py) on a
real 2-node local Ray cluster: dispatch through it equals the local transport (including layers
where a shard gets no tokens), and close() leaves no shard actor behind."""
from __future__ import annotations

import pytest
import ray
import torch

from serving.deployments.config import node_resource
from serving.local_ray import local_ray_cluster
from serving.model.checkpoint import write_checkpoint
from serving.model.config import MoEConfig
from serving.parallel.compiled_graph_transport import CompiledGraphTransport
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement

pytestmark = pytest.mark.cluster
NODES = 2


@pytest.fixture(scope="module")
def cluster():
    with local_ray_cluster(NODES) as node_of:
        yield node_of


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("mixtral", "tiny", tmp_path_factory.mktemp("cg") / "ck")


def _routing(cfg: MoEConfig, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, cfg.hidden_size, generator=g)
    w_TK, ids_TK = torch.topk(torch.softmax(torch.randn(T, cfg.num_experts, generator=g), -1), cfg.top_k)
    return x_TD, ids_TK, w_TK


def test_dispatch_equals_local_and_close_kills_the_shards(cluster, ckpt):
    cfg = MoEConfig.from_dir(ckpt)
    placement = Placement.build(cfg, 2, "round_robin")
    transport = CompiledGraphTransport(str(ckpt), placement, torch.float32,
                                       [{node_resource(s % NODES): 0.001} for s in range(2)])
    try:
        graph = ExpertDispatcher(placement, transport, cfg.num_experts)
        ref = ExpertDispatcher(placement, LocalTransport(
            [ExpertShardWorker.from_checkpoint(ckpt, placement, s) for s in range(2)]), cfg.num_experts)
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
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.__ray_ready__.remote(), timeout=30)
