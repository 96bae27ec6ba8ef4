"""Automatic expert rebalancing (serving/parallel/rebalance.py): when a window of routed load leaves the
shards unbalanced, a load-aware placement is published; quiet, balanced or already-rebalanced
windows publish nothing. Plain objects with fakes for the cluster around them; the MetricsHub's side
(routed_load, the decision metrics) on a real hub."""
from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from serving.deployments.config import AppConfig
from serving.metrics import MetricsHub
from serving.model.config import MoEConfig
from serving.parallel.placement import Placement
from serving.parallel.rebalance import AutoRebalancer, LoadWindow, RebalancePolicy, decide, step_imbalance

E = 8


def _config(layers: int = 2) -> MoEConfig:
    return MoEConfig(family="mixtral", vocab_size=32, hidden_size=8, num_layers=layers, num_heads=2,
                     num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=64, num_experts=E, top_k=2, moe_intermediate_size=12,
                     norm_topk_prob=True, moe_layers=(True,) * layers)


# experts 4..7 (shard 1 of a contiguous 2-shard placement) get 3x the tokens of experts 0..3
SKEWED = [1000.0] * 4 + [3000.0] * 4
UNIFORM = [2000.0] * E


def test_step_imbalance_is_the_busiest_shard_summed_over_layers():
    config = _config()
    contiguous = Placement.build(config, 2, "contiguous")
    # layer 0: shards 4000 / 12000 (mean 8000); layer 1: uniform, 8000 / 8000
    assert step_imbalance(contiguous, {0: SKEWED, 1: UNIFORM}) == pytest.approx((12000 + 8000) / (8000 + 8000))
    assert step_imbalance(contiguous, {0: UNIFORM, 1: UNIFORM}) == pytest.approx(1.0)


def test_decide_publishes_a_load_aware_plan_only_when_it_pays():
    config, policy = _config(), RebalancePolicy()
    contiguous = Placement.build(config, 2, "contiguous")
    skewed = {0: SKEWED, 1: SKEWED}
    d = decide(policy, config, contiguous, skewed)
    assert d.reason == "rebalanced" and d.plan is not None
    assert d.before == pytest.approx(1.5) and d.after < 1.05
    assert d.after == pytest.approx(step_imbalance(d.plan, skewed))
    assert d.window_tokens == pytest.approx(sum(SKEWED))
    # every shard still holds every expert some copy of which it serves, and every expert is somewhere
    for layer in d.plan.layers:
        assert sorted({e for s in range(2) for e in d.plan.experts_of(s)[layer]}) == list(range(E))
    # that plan in force, the same load: nothing better to publish
    again = decide(policy, config, d.plan, skewed)
    assert again.plan is None and again.reason == "balanced"
    # balanced load: nothing to do; a quiet window is not judged
    assert decide(policy, config, contiguous, {0: UNIFORM, 1: UNIFORM}).reason == "balanced"
    quiet = decide(policy, config, contiguous, {0: [x / 100 for x in SKEWED], 1: [x / 100 for x in SKEWED]})
    assert quiet.reason == "quiet" and quiet.plan is None


def test_a_plan_that_gains_too_little_is_not_taken():
    config = _config()
    contiguous = Placement.build(config, 2, "contiguous")
    # without redundant copies a single hot expert cannot be split: the plan barely helps
    policy = RebalancePolicy(redundant=0, min_gain=0.5)
    hot = [200.0] * 7 + [20000.0]
    d = decide(policy, config, contiguous, {0: hot, 1: hot})
    assert d.reason == "no_gain" and d.plan is None and d.before > policy.trigger_imbalance
    assert d.before - d.after < policy.min_gain * (d.before - 1.0)


def test_the_load_window_is_the_difference_of_the_counters():
    w = LoadWindow()
    assert w.advance({0: [5.0, 1.0]}) == {0: [5.0, 1.0]}
    assert w.advance({0: [8.0, 1.0], 1: [2.0, 2.0]}) == {0: [3.0, 0.0], 1: [2.0, 2.0]}
    assert w.advance({0: [1.0, 4.0], 1: [2.0, 2.0]}) == {0: [1.0, 3.0], 1: [0.0, 0.0]}   # a reset counter


def test_the_rebalancer_publishes_once_and_then_holds():
    config = _config()
    deployed = Placement.build(config, 2, "contiguous")
    published: list[Placement] = []
    counters = {0: [0.0] * E, 1: [0.0] * E}

    def route(load):                       # traffic: the hub's cumulative counters grow
        for layer in counters:
            counters[layer] = [c + n for c, n in zip(counters[layer], load)]

    def publish(plan: Placement) -> Placement:
        versioned = Placement(num_shards=plan.num_shards, copies=plan.copies, version=len(published) + 1)
        published.append(versioned)
        return versioned

    route(SKEWED)                          # before the rebalancer started: not part of any window
    r = AutoRebalancer(RebalancePolicy(), config, lambda: {k: list(v) for k, v in counters.items()},
                       lambda: published[-1] if published else deployed, publish)
    assert r.tick().reason == "quiet" and not published
    route(SKEWED)
    d = r.tick()
    assert d.reason == "rebalanced" and d.plan is published[0] and d.plan.version == 1
    route(SKEWED)
    assert r.tick().reason == "balanced" and len(published) == 1
    # the hot experts move to those only shard 0 holds now: a new plan
    only_on_0 = [e for e in range(E) if published[0].copies[0][e] == (0,)]
    assert only_on_0 and published[0].copies[0] == published[0].copies[1]
    route([5000.0 if e in only_on_0 else 500.0 for e in range(E)])
    assert r.tick().reason == "rebalanced" and len(published) == 2 and r.last.plan.version == 2


def test_the_hub_reads_routed_load_and_exports_the_decisions():
    hub = MetricsHub()
    hub.metrics.routed.labels("0", "3", "0").inc(5)
    hub.metrics.routed.labels("0", "3", "1").inc(2)            # a copy of expert 3 on shard 1
    hub.metrics.routed.labels("1", "7", "1").inc(4)
    assert hub.routed_load(E) == {0: [0, 0, 0, 7, 0, 0, 0, 0], 1: [0, 0, 0, 0, 0, 0, 0, 4]}
    config = _config()
    d = decide(RebalancePolicy(), config, Placement.build(config, 2, "contiguous"), {0: SKEWED, 1: SKEWED})
    hub.apply_rebalance(d, 3)
    text = generate_latest(hub.metrics.registry).decode()
    assert 'moe_serve_expert_rebalance_decisions_total{outcome="rebalanced"} 1.0' in text
    assert 'moe_serve_expert_placement_step_imbalance{placement="current"} 1.5' in text
    assert "moe_serve_expert_placement_version 3.0" in text


def test_app_config_takes_the_policy_as_a_mapping():
    cfg = AppConfig.from_args({"checkpoint": "x", "transport": "collective", "auto_rebalance": {"interval_s": 5}})
    assert cfg.auto_rebalance == RebalancePolicy(interval_s=5)
    assert AppConfig.from_args(cfg.to_args()) == cfg
    assert AppConfig(checkpoint="x").auto_rebalance is None                     # off by default
    with pytest.raises(ValueError, match="unknown keys"):
        AppConfig.from_args({"checkpoint": "x", "auto_rebalance": {"interval": 5}})
    with pytest.raises(ValueError, match="expert shards to balance"):
        AppConfig.from_args({"checkpoint": "x", "transport": "local", "auto_rebalance": {}})
    with pytest.raises(ValueError, match="min_gain"):
        RebalancePolicy(min_gain=0)
