"""The Ray adapter against Ray 2.60's real AutoscalingContext / AutoscalingPolicy (no cluster), and our
mirror of Ray's default policy against Ray's own code."""
import random

import pytest

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.filterwarnings("ignore:The `metrics_interval_s`:DeprecationWarning")

from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue  # noqa: E402
from ray.serve._private.autoscaling_state import _resolve_policy_callable  # noqa: E402
from ray.serve import autoscaling_policy as rp  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy  # noqa: E402

from serving.autoscaling import decisions  # noqa: E402
from serving.autoscaling.policy import Reason  # noqa: E402
from serving.autoscaling.ray_adapter import (COUNTS_KEY, LAST_DECISION_KEY, STATE_KEY, EngineAutoscalingPolicy,  # noqa: E402
                                             ShardAutoscalingPolicy, autoscaling_config, engine_signals)
from serving.autoscaling.ray_default import (ServeAutoscalingConfig, apply_delay_logic, apply_scaling_factors,  # noqa: E402
                                             ray_default_desired, serve_wrap)
from serving.autoscaling.signals import engine_autoscaling_stats, shard_autoscaling_stats  # noqa: E402

ENGINE = "serving.autoscaling.ray_adapter:engine_policy"


def ctx_for(reports, *, running=None, target=None, now=1000.0, state=None, cfg=None, name="EngineReplica",
            queued=0.0, ongoing=0.0):
    """A real AutoscalingContext whose replicas reported `reports` (list of dicts) via record_autoscaling_stats."""
    dep = DeploymentID(name=name, app_name="moe")
    reps = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(len(reports))]
    raw, agg = {}, {}
    for rid, rep in zip(reps, reports):
        for k, v in rep.items():
            raw.setdefault(k, {})[rid] = [TimeStampedValue(now - 2, v * 0.5), TimeStampedValue(now - 0.5, v)]
            agg.setdefault(k, {})[rid] = v * 0.75
    n = len(reports) if running is None else running
    cfg = cfg or AutoscalingConfig(min_replicas=1, max_replicas=50, upscale_delay_s=0, downscale_delay_s=0,
                                   metrics_interval_s=0.5, look_back_period_s=2)
    return AutoscalingContext(deployment_id=dep, deployment_name=name, app_name="moe", current_num_replicas=n,
                              target_num_replicas=n if target is None else target, running_replicas=reps,
                              total_num_requests=ongoing, total_queued_requests=queued,
                              aggregated_metrics=lambda: agg, raw_metrics=lambda: raw,
                              capacity_adjusted_min_replicas=cfg.min_replicas,
                              capacity_adjusted_max_replicas=cfg.max_replicas, policy_state=state or {},
                              last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=cfg)


def test_ctx_to_signals_sums_replicas_and_takes_latest_samples():
    reports = [engine_autoscaling_stats(queue_depth=30, running=16, prefill_tokens_waiting=900, ttft_p90_s=1.0),
               engine_autoscaling_stats(queue_depth=10, running=8, ttft_p90_s=3.0, arrivals_per_s=4,
                                        completed_per_s=2)]
    s = engine_signals(ctx_for(reports, target=3))
    assert (s.queue_depth, s.running_requests, s.prefill_tokens_waiting) == (40, 24, 900)
    assert s.running_replicas == 2 and s.target_replicas == 3 and s.now == 1000.0
    assert s.ttft_p90_s == 3.0 and (s.arrivals_per_s, s.completed_per_s) == (4, 2)
    s = engine_signals(ctx_for(reports), use_latest=False)      # window aggregates instead
    assert s.queue_depth == pytest.approx(30)


def test_falls_back_to_serve_counts_before_replicas_report():
    s = engine_signals(ctx_for([], running=2, queued=7, ongoing=12))
    assert (s.queue_depth, s.running_requests) == (7, 5)


def test_policy_class_through_serves_own_wrapper(tmp_path):
    decisions.reset()
    seen = []
    decisions.set_decision_hook(lambda *a: seen.append(a))
    pol = AutoscalingPolicy(policy_function=ENGINE, policy_kwargs={"target_ongoing_per_replica": 10,
                                                                   "cold_start_s": 5, "downscale_stable_s": 30})
    fn = rp._apply_autoscaling_config(_resolve_policy_callable(pol))     # exactly what the controller runs
    reports = [engine_autoscaling_stats(queue_depth=40, running=16)] * 2
    n, state = fn(ctx_for(reports))
    assert n == 12                                                       # (80 + 32) / 10, at once
    assert state[LAST_DECISION_KEY]["reason"] == Reason.QUEUE_BACKLOG
    assert state[COUNTS_KEY] == {Reason.QUEUE_BACKLOG: 1}
    assert "__decision_counters" in state                                # Serve's internal keys survive
    # next tick: the 10 new replicas are still starting -> hold
    n, state = fn(ctx_for(reports, target=12, state=state, now=1001.0))
    assert n == 12 and state[LAST_DECISION_KEY]["reason"] == Reason.COLD_START_PENDING
    assert state[STATE_KEY]["last_upscale_t"] == 1000.0
    assert seen == [("EngineReplica", 12, 2, Reason.QUEUE_BACKLOG), ("EngineReplica", 12, 2, Reason.COLD_START_PENDING)]
    assert decisions.last_decisions()["EngineReplica"].reason == Reason.COLD_START_PENDING
    assert decisions.decision_counts()[("EngineReplica", Reason.QUEUE_BACKLOG)] == 1
    decisions.reset()


def test_hook_by_import_path_and_a_broken_hook_never_breaks_scaling(monkeypatch):
    import serving.autoscaling.decisions as d
    calls = []
    monkeypatch.setattr(d, "_test_hook", lambda *a: calls.append(a), raising=False)
    pol = EngineAutoscalingPolicy(on_decision="serving.autoscaling.decisions:_test_hook")
    pol(ctx_for([engine_autoscaling_stats(queue_depth=0, running=1)]))
    assert calls and calls[0][0] == "EngineReplica"
    d.set_decision_hook(lambda *a: 1 / 0)
    n, _ = EngineAutoscalingPolicy()(ctx_for([engine_autoscaling_stats(queue_depth=0, running=1)]))
    assert n == 1
    d.reset()
    with pytest.raises(ValueError):
        decisions.resolve_hook("no_colon")


def test_serve_bounds_win():
    cfg = AutoscalingConfig(min_replicas=2, max_replicas=3, upscale_delay_s=0, downscale_delay_s=0)
    n, st = EngineAutoscalingPolicy()(ctx_for([engine_autoscaling_stats(queue_depth=500, running=16)] * 2, cfg=cfg))
    assert n == 3 and st[LAST_DECISION_KEY]["reason"] == Reason.AT_MAX


def test_shard_policy_reads_tokens_per_s():
    pol = ShardAutoscalingPolicy(target_tokens_per_s_per_replica=1000)
    n, st = pol(ctx_for([shard_autoscaling_stats(tokens_per_s=2500, busy_fraction=0.9)], name="ExpertShard1"))
    assert n == 3 and st[LAST_DECISION_KEY]["reason"] == Reason.TOKEN_LOAD


def test_autoscaling_config_helper_is_valid_for_serve():
    d = autoscaling_config("engine", min_replicas=1, max_replicas=4, ttft_slo_s=2.0)
    cfg = AutoscalingConfig(**d)
    assert cfg.policy.policy_function == ENGINE and cfg.upscale_delay_s == 0
    assert isinstance(_resolve_policy_callable(cfg.policy), EngineAutoscalingPolicy)


# ---- our mirror of Ray's default policy == Ray's code ------------------------------------------------
def test_ray_default_mirror_matches_ray():
    rng = random.Random(0)
    ray_cfg = AutoscalingConfig(min_replicas=1, max_replicas=40)
    ours_cfg = ServeAutoscalingConfig(min_replicas=1, max_replicas=40)
    wrapped = rp._apply_autoscaling_config(rp.replica_queue_length_autoscaling_policy)
    ray_state, our_state, target = {}, {}, 3
    for step in range(400):
        now = step * 1.7
        running = rng.randint(0, target)
        ongoing = rng.choice([0.0, rng.uniform(0, 120)])
        ctx = ctx_for([], running=running, target=target, now=now, state=ray_state, cfg=ray_cfg, ongoing=ongoing)
        ctx.__dict__["current_time"] = now
        ray_n, ray_state = wrapped(ctx)
        ray_n = max(1, min(40, ray_n))                                   # AutoscalingState.apply_bounds
        desired = ray_default_desired(ongoing, running, target, ours_cfg)
        our_n, our_state = serve_wrap(desired, current_num_replicas=running, target_num_replicas=target,
                                      total_num_requests=ongoing, config=ours_cfg, policy_state=our_state, now=now)
        assert our_n == ray_n, step
        target = our_n


def test_scaling_factors_and_delay_logic_match_ray():
    for f in (0.5, 1.0, 2.0):
        rc = AutoscalingConfig(min_replicas=1, max_replicas=100, upscaling_factor=f, downscaling_factor=f)
        oc = ServeAutoscalingConfig(min_replicas=1, max_replicas=100, upscaling_factor=f, downscaling_factor=f)
        for desired in (0.4, 1.0, 3.3, 7.0, 12.9, 50.0):
            for cur in (0, 1, 5, 10):
                assert apply_scaling_factors(desired, cur, oc) == rp._apply_scaling_factors(desired, cur, rc)
    rc, oc = AutoscalingConfig(min_replicas=0, max_replicas=10), ServeAutoscalingConfig(min_replicas=0, max_replicas=10)
    rs, os_ = {}, {}
    for t, desired, tgt in [(0, 5, 2), (10, 5, 2), (31, 5, 2), (40, 1, 5), (700, 1, 5), (701, 0, 1), (1400, 0, 1)]:
        a = rp._apply_delay_logic(desired, tgt, rc, rs, _now=float(t))
        b = apply_delay_logic(desired, tgt, oc, os_, float(t))
        assert a == b


@pytest.mark.cluster
def test_serve_calls_our_policy_on_a_real_cluster(monkeypatch):
    """Serve's controller imports the policy by path, feeds it record_autoscaling_stats, and scales."""
    import os
    import time
    from pathlib import Path

    import ray
    from ray import serve

    repo = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))

    @serve.deployment(ray_actor_options={"num_cpus": 0.01}, autoscaling_config={
        **autoscaling_config("engine", min_replicas=1, max_replicas=3, target_ongoing_per_replica=4),
        "look_back_period_s": 1.0})
    class Loaded:
        def record_autoscaling_stats(self):
            return engine_autoscaling_stats(queue_depth=20, running=4, ttft_p90_s=0.5)

        def __call__(self):
            return "ok"

    import shutil

    from local_ray_init import init_local_ray
    # a new local cluster of our own (never one already running here), on loopback
    ray_tmp = init_local_ray(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        serve.run(Loaded.bind(), name="autoscale-test", route_prefix=None)
        deadline, running = time.monotonic() + 45, 0
        while time.monotonic() < deadline:
            dep = serve.status().applications["autoscale-test"].deployments["Loaded"]
            running = dep.replica_states.get("RUNNING", 0)
            if running == 3:
                break
            time.sleep(0.5)
        assert running == 3            # (20 + 4) / 4 = 6 per replica report, capped by max_replicas=3
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
