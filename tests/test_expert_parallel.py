"""Placement and dispatch/combine: sharding experts must not change the MoE output."""
import pytest
import torch

from serving.model.config import MoEConfig
from serving.model.moe import ExpertWeights, experts_forward
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement


def _config(E: int = 6, layers: int = 2) -> MoEConfig:
    return MoEConfig(family="mixtral", vocab_size=32, hidden_size=8, num_layers=layers, num_heads=2,
                     num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=64, num_experts=E, top_k=2, moe_intermediate_size=12,
                     norm_topk_prob=True, moe_layers=(True,) * layers)


def _experts(E: int, D: int = 8, I: int = 12, seed: int = 0) -> dict[int, ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    return {e: ExpertWeights(torch.randn(I, D, generator=g), torch.randn(I, D, generator=g),
                             torch.randn(D, I, generator=g)) for e in range(E)}


@pytest.mark.parametrize("strategy", ["contiguous", "round_robin"])
def test_placement_partitions_every_layer(strategy):
    cfg = _config(E=7, layers=3)
    p = Placement.build(cfg, 3, strategy)
    for layer in cfg.moe_layer_ids:
        held = sorted(e for s in range(3) for e in p.experts_of(s)[layer])
        assert held == list(range(7))                      # each expert on exactly one shard
        assert all(p.experts_of(s)[layer] for s in range(3))  # no empty shard
    assert Placement.from_json(p.to_json()) == p


def test_placement_rejects_bad_shard_counts():
    with pytest.raises(ValueError, match="expert_shards"):
        Placement.build(_config(E=4), 5)
    with pytest.raises(ValueError, match="strategy"):
        Placement.build(_config(E=4), 2, "random")


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_dispatch_over_shards_equals_all_experts_in_one_place(num_shards):
    E, T, K = 6, 37, 2
    cfg = _config(E=E)
    experts = _experts(E)
    placement = Placement.build(cfg, num_shards, "round_robin")
    workers = [ExpertShardWorker({layer: {e: experts[e] for e in ids}
                                  for layer, ids in placement.experts_of(s).items()}, s)
               for s in range(num_shards)]
    dispatcher = ExpertDispatcher(placement, LocalTransport(workers), E)
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T, 8, generator=g)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w_TK = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    expected = experts_forward(x_TD, ids_TK, w_TK, experts)
    torch.testing.assert_close(dispatcher(0, x_TD, ids_TK, w_TK), expected, rtol=1e-5, atol=1e-5)
    counts = dispatcher.take_routed_counts()
    per_expert = [sum(c[e] for c in counts[0]) for e in range(E)]
    assert per_expert == torch.bincount(ids_TK.flatten(), minlength=E).tolist()
    for shard, c in enumerate(counts[0]):                 # counted on the shard that holds it
        assert all(n == 0 or shard in placement.copies[0][e] for e, n in enumerate(c))
    assert sum(map(sum, counts[1])) == 0 and sum(map(sum, dispatcher.take_routed_counts()[0])) == 0


def test_shard_only_receives_tokens_routed_to_its_experts():
    E = 4
    cfg = _config(E=E, layers=1)
    experts = _experts(E)
    placement = Placement.build(cfg, 2, "contiguous")          # shard 0: {0,1}, shard 1: {2,3}
    seen = {}

    class Recording(LocalTransport):
        def run(self, layer, calls):
            for c in calls:
                seen[c.shard] = c.topk_ids_NK.clone()
            return super().run(layer, calls)

    workers = [ExpertShardWorker({0: {e: experts[e] for e in placement.experts_of(s)[0]}}, s) for s in range(2)]
    d = ExpertDispatcher(placement, Recording(workers), E)
    ids_TK = torch.tensor([[0, 1], [0, 1], [2, 3], [1, 2]])
    d(0, torch.randn(4, 8), ids_TK, torch.full((4, 2), 0.5))
    # tokens 0, 1, 3 go to shard 0 and tokens 2, 3 to shard 1; a slot served by the other
    # shard is masked with the sentinel E (= 4), so no expert is computed twice
    assert seen[0].tolist() == [[0, 1], [0, 1], [1, 4]]
    assert seen[1].tolist() == [[2, 3], [4, 2]]


def _skewed_routing(T: int, E: int, K: int, hot: int, seed: int = 0):
    """Top-k ids where expert `hot` is in every token's top-k (> 50% of the routed slots when K = 2)."""
    g = torch.Generator().manual_seed(seed)
    rest = torch.stack([torch.randperm(E - 1, generator=g)[:K - 1] for _ in range(T)])
    rest = rest + (rest >= hot).long()
    return torch.cat([torch.full((T, 1), hot), rest], dim=1)


def _measured_imbalance(placement, experts, E, ids_TK):
    from serving.parallel.placement import imbalance
    workers = [ExpertShardWorker({0: {e: experts[e] for e in placement.experts_of(s)[0]}}, s)
               for s in range(placement.num_shards)]
    d = ExpertDispatcher(placement, LocalTransport(workers), E)
    T, K = ids_TK.shape
    x_TD = torch.randn(T, 8)
    w_TK = torch.full((T, K), 1.0 / K)
    y = d(0, x_TD, ids_TK, w_TK)
    torch.testing.assert_close(y, experts_forward(x_TD, ids_TK, w_TK, experts), rtol=1e-5, atol=1e-5)
    per_shard = [sum(c) for c in d.take_routed_counts()[0]]
    return imbalance(per_shard), per_shard


def test_load_aware_placement_fixes_a_skewed_load_with_redundant_copies():
    E, K, S, T = 8, 2, 4, 400
    cfg = _config(E=E, layers=1)
    experts = _experts(E)
    ids_TK = _skewed_routing(T, E, K, hot=3)
    load = {0: torch.bincount(ids_TK.flatten(), minlength=E).tolist()}
    assert load[0][3] / sum(load[0]) >= 0.5
    before, _ = _measured_imbalance(Placement.build(cfg, S, "contiguous"), experts, E, ids_TK)
    aware = Placement.build(cfg, S, "load_aware", load=load)
    after, per_shard = _measured_imbalance(aware, experts, E, ids_TK)
    assert before > 1.5 and after < 1.25, (before, after, per_shard)
    assert len(aware.copies[0][3]) > 1                      # the hot expert is replicated
    assert abs(aware.predicted_imbalance(load)[0] - after) < 0.1
    slots = [len(aware.experts_of(s)[0]) for s in range(S)]
    assert max(slots) - min(slots) <= 1                     # equal memory per shard


def test_load_aware_without_skew_needs_no_copies_and_stays_balanced():
    cfg = _config(E=6, layers=2)
    p = Placement.build(cfg, 3, "load_aware", load={0: [10] * 6, 1: [10] * 6}, redundant=0)
    for layer in (0, 1):
        assert all(len(c) == 1 for c in p.copies[layer])
        assert p.predicted_imbalance({0: [10] * 6, 1: [10] * 6})[layer] == 1.0


def test_swapping_placement_keeps_the_output():
    E = 6
    cfg = _config(E=E, layers=1)
    experts = _experts(E)
    all_workers = [ExpertShardWorker({0: dict(experts)}, s) for s in range(3)]  # every shard holds all
    d = ExpertDispatcher(Placement.build(cfg, 3, "round_robin"), LocalTransport(all_workers), E)
    x_TD, ids_TK = torch.randn(20, 8), _skewed_routing(20, E, 2, hot=1)
    w_TK = torch.full((20, 2), 0.5)
    before = d(0, x_TD, ids_TK, w_TK)
    d.set_placement(Placement.build(cfg, 3, "load_aware", load={0: [1, 50, 1, 1, 1, 1]}))
    torch.testing.assert_close(d(0, x_TD, ids_TK, w_TK), before, rtol=1e-5, atol=1e-5)
