"""The pure autoscaling policies (no Ray): up fast and proportional, down slow, reasons, bounds."""
import random

import pytest

from serving.autoscaling.policy import (EnginePolicyConfig, PolicyState, Reason, ShardPolicyConfig,
                                        decide_engine_replicas, decide_shard_replicas, plan_shard_replicas)
from serving.autoscaling.ray_default import (ServeAutoscalingConfig, apply_delay_logic, ray_default_desired,
                                             serve_wrap)
from serving.autoscaling.signals import ShardSignals, Signals

CFG = EnginePolicyConfig(min_replicas=1, max_replicas=100, target_ongoing_per_replica=10, ttft_slo_s=2.0,
                         cold_start_s=10, downscale_stable_s=60, downscale_step_interval_s=15,
                         downscale_step_frac=0.25, hysteresis=0.15)


def sig(now=0.0, running=2, target=None, q=0.0, r=0.0, **kw):
    return Signals(now=now, running_replicas=running, target_replicas=running if target is None else target,
                   queue_depth=q, running_requests=r, **kw)


def test_upscale_is_proportional_to_backlog_not_plus_one():
    d = decide_engine_replicas(sig(running=2, q=180, r=20), CFG)
    assert d.num_replicas == 16                     # (180 + 20) / 10, capped at 8x the 2 ordered
    assert d.reason == Reason.QUEUE_BACKLOG
    d = decide_engine_replicas(sig(running=4, q=50, r=40), CFG)
    assert d.num_replicas == 9 and d.reason == Reason.QUEUE_BACKLOG


def test_max_step_up_caps_one_decision():
    d = decide_engine_replicas(sig(running=1, q=5000), CFG)
    assert d.num_replicas == 8                      # 1 x max_step_up
    assert decide_engine_replicas(sig(running=8, q=5000), CFG).num_replicas == 64


def test_ttft_over_slo_boosts_beyond_the_backlog():
    base = decide_engine_replicas(sig(running=10, q=5, r=90, ttft_p90_s=1.0), CFG)
    assert base.num_replicas == 10 and base.reason == Reason.STEADY
    d = decide_engine_replicas(sig(running=10, q=5, r=90, ttft_p90_s=3.0), CFG)
    assert d.num_replicas == 15 and d.reason == Reason.TTFT_SLO_BREACH     # 10 x 3/2
    d = decide_engine_replicas(sig(running=10, q=5, r=90, ttft_p90_s=30.0), CFG)
    assert d.num_replicas == 20                                             # boost capped at 2x
    # a stale TTFT with an empty queue does not order capacity
    assert decide_engine_replicas(sig(running=10, q=0, r=90, ttft_p90_s=30.0), CFG).num_replicas == 10


def test_arrival_surge_sees_shed_demand():
    # queue bounded (so the backlog term sees 2x), but offered load is 5x what is being served
    d = decide_engine_replicas(sig(running=10, q=10, r=100, arrivals_per_s=50, completed_per_s=10), CFG)
    assert d.reason == Reason.ARRIVAL_SURGE and d.num_replicas == 50


def test_cold_starting_replicas_are_not_ordered_twice():
    d1 = decide_engine_replicas(sig(now=0, running=2, q=180, r=20), CFG)
    assert d1.num_replicas == 16
    # same backlog next tick: the 14 ordered replicas are still starting -> hold, no new order
    d2 = decide_engine_replicas(sig(now=1, running=2, target=16, q=140, r=20), CFG, d1.new_state)
    assert d2.num_replicas == 16 and d2.reason == Reason.COLD_START_PENDING
    # without a known target the policy remembers its own pending order until cold_start_s passes
    d1b = decide_engine_replicas(Signals(now=0, running_replicas=2, queue_depth=180, running_requests=20), CFG)
    assert d1b.num_replicas == 16 and d1b.new_state.pending == ((0, 14),)
    d3 = decide_engine_replicas(Signals(now=1, running_replicas=2, queue_depth=140, running_requests=20),
                                CFG, d1b.new_state)
    assert d3.num_replicas == 16 and d3.reason == Reason.COLD_START_PENDING
    d3 = decide_engine_replicas(Signals(now=11, running_replicas=2, queue_depth=140, running_requests=20),
                                CFG, d3.new_state)       # order expired (never came up): order again
    assert d3.num_replicas == 16 and d3.reason == Reason.QUEUE_BACKLOG
    # backlog outgrows what is starting: order only the difference
    d4 = decide_engine_replicas(sig(now=2, running=2, target=16, q=280, r=20), CFG, d2.new_state)
    assert d4.num_replicas == 30 and d4.reason == Reason.QUEUE_BACKLOG


def test_no_downscale_right_after_upscale_and_hysteresis_before_stepping_down():
    st = decide_engine_replicas(sig(now=0, running=4, q=200, r=40), CFG).new_state   # -> 24
    d = decide_engine_replicas(sig(now=5, running=24, q=0, r=10), CFG, st)
    assert d.num_replicas == 24 and d.reason == Reason.HOLD_HYSTERESIS
    for t in range(6, 66, 5):
        d = decide_engine_replicas(sig(now=t, running=24, q=0, r=10), CFG, d.new_state)
        assert d.num_replicas == 24 and d.reason == Reason.HOLD_HYSTERESIS
    d = decide_engine_replicas(sig(now=66, running=24, q=0, r=10), CFG, d.new_state)
    assert d.num_replicas == 18 and d.reason == Reason.SCALE_DOWN        # one 25% step
    d2 = decide_engine_replicas(sig(now=70, running=18, q=0, r=10), CFG, d.new_state)
    assert d2.num_replicas == 18 and d2.reason == Reason.HOLD_HYSTERESIS   # next step waits the interval
    d3 = decide_engine_replicas(sig(now=81, running=18, q=0, r=0), CFG, d2.new_state)
    assert d3.num_replicas == 14 and d3.reason == Reason.SCALE_DOWN_IDLE


def test_a_blip_resets_the_downscale_window():
    d = decide_engine_replicas(sig(now=0, running=20, q=0, r=50), CFG)
    assert d.reason == Reason.HOLD_HYSTERESIS
    d = decide_engine_replicas(sig(now=50, running=20, q=0, r=190), CFG, d.new_state)     # back near target
    assert d.reason == Reason.STEADY and d.new_state.down_since is None
    d = decide_engine_replicas(sig(now=70, running=20, q=0, r=50), CFG, d.new_state)
    assert d.num_replicas == 20 and d.reason == Reason.HOLD_HYSTERESIS


def test_noisy_load_does_not_oscillate():
    rng = random.Random(0)
    st, replicas, changes = PolicyState(), 10, []
    for t in range(0, 1800):
        load = 100 * (1 + rng.uniform(-0.25, 0.25))          # +-25% noise around 10 replicas' worth
        d = decide_engine_replicas(sig(now=t, running=replicas, q=0, r=load), CFG, st)
        st = d.new_state
        if d.num_replicas != replicas:
            changes.append((t, replicas, d.num_replicas, d.reason))
            replicas = d.num_replicas
    # it may settle once (up past the deadband), never flap
    assert len(changes) <= 2, changes
    assert all(c[2] >= c[1] for c in changes)


def test_bounds_and_reasons_at_the_edges():
    cfg = EnginePolicyConfig(min_replicas=2, max_replicas=6, target_ongoing_per_replica=10)
    d = decide_engine_replicas(sig(running=4, q=1000), cfg)
    assert d.num_replicas == 6 and d.reason == Reason.AT_MAX
    d = decide_engine_replicas(sig(running=6, q=1000), cfg, d.new_state)
    assert d.num_replicas == 6 and d.reason == Reason.AT_MAX
    d = decide_engine_replicas(sig(running=2, q=0, r=0), cfg)
    assert d.num_replicas == 2 and d.reason == Reason.AT_MIN
    assert decide_engine_replicas(sig(running=1, target=1, q=0), cfg).num_replicas == 2
    # idle long enough: steps down to min, never below
    st, n = PolicyState(), 6
    for t in range(0, 600, 5):
        d = decide_engine_replicas(sig(now=t, running=n, q=0, r=0), cfg, st)
        st, n = d.new_state, d.num_replicas
    assert n == 2
    with pytest.raises(ValueError):
        EnginePolicyConfig(min_replicas=5, max_replicas=2)


def test_every_reason_is_a_known_label():
    seen = set()
    st = PolicyState()
    for s in (sig(running=2, q=500), sig(running=2, q=0, r=20), sig(now=1, running=2, target=10, q=50, r=20),
              sig(running=10, q=1, r=95, ttft_p90_s=5.0)):
        seen.add(decide_engine_replicas(s, CFG, st).reason)
    assert seen <= set(Reason.ALL)
    assert {Reason.QUEUE_BACKLOG, Reason.STEADY, Reason.COLD_START_PENDING, Reason.TTFT_SLO_BREACH} <= seen


SHARD = ShardPolicyConfig(min_replicas=1, max_replicas=8, target_tokens_per_s_per_replica=1000, cold_start_s=5)


def test_shard_scales_on_its_own_token_load():
    d = decide_shard_replicas(ShardSignals(now=0, running_replicas=1, target_replicas=1, tokens_per_s=3500), SHARD)
    assert d.num_replicas == 4 and d.reason == Reason.TOKEN_LOAD
    d = decide_shard_replicas(ShardSignals(now=0, running_replicas=1, target_replicas=1, tokens_per_s=600), SHARD)
    assert d.num_replicas == 1 and d.reason == Reason.STEADY


def test_hottest_shard_scales_first():
    shards = {f"shard{i}": ShardSignals(now=0, running_replicas=1, target_replicas=1, tokens_per_s=tps)
              for i, tps in enumerate((900, 4000, 1500))}
    plan = plan_shard_replicas(shards, SHARD)
    assert plan["shard1"].num_replicas == 4 and plan["shard2"].num_replicas == 2 and plan["shard0"].num_replicas == 1
    plan = plan_shard_replicas(shards, SHARD, total_budget=6)     # 3 held + 3 spare: the hot shard gets them
    assert plan["shard1"].num_replicas == 4
    assert plan["shard2"].num_replicas == 1 and plan["shard2"].reason == Reason.BUDGET_EXHAUSTED
    # over time with a ramping load, the hot shard's first upscale comes first
    first_up = {}
    states = {k: PolicyState() for k in shards}
    reps = {k: 1 for k in shards}
    for t in range(60):
        for k, share in (("shard0", 0.15), ("shard1", 0.6), ("shard2", 0.25)):
            s = ShardSignals(now=t, running_replicas=reps[k], target_replicas=reps[k], tokens_per_s=share * 200 * t)
            d = decide_shard_replicas(s, SHARD, states[k])
            states[k] = d.new_state
            if d.num_replicas > reps[k] and k not in first_up:
                first_up[k] = t
            reps[k] = d.num_replicas
    assert first_up["shard1"] < first_up["shard2"] < first_up["shard0"]


def test_state_round_trips_through_a_dict():
    d = decide_engine_replicas(Signals(now=3, running_replicas=2, queue_depth=100), CFG)
    assert PolicyState.from_dict(d.new_state.to_dict()) == d.new_state
    assert PolicyState.from_dict(None) == PolicyState()


# ---- Ray's default policy, mirrored ----------------------------------------------------------------
def test_ray_default_policy_is_ongoing_over_target_with_delays():
    cfg = ServeAutoscalingConfig(min_replicas=1, max_replicas=100)
    assert ray_default_desired(40, 4, 4, cfg) == pytest.approx(20.0)      # 40 ongoing / target 2
    state, target = {}, 4
    for t in range(0, 30):      # wants 20 for 29 s: still 4 (upscale_delay_s=30)
        target, state = serve_wrap(20, current_num_replicas=4, target_num_replicas=4, total_num_requests=40,
                                   config=cfg, policy_state=state, now=float(t))
        assert target == 4
    target, state = serve_wrap(20, current_num_replicas=4, target_num_replicas=4, total_num_requests=40,
                               config=cfg, policy_state=state, now=30.0)
    assert target == 20
    n, st = apply_delay_logic(2, 20, cfg, {}, 0.0)
    assert n == 20
    n, st = apply_delay_logic(2, 20, cfg, st, 599.0)
    assert n == 20
    n, st = apply_delay_logic(2, 20, cfg, st, 600.0)
    assert n == 2
