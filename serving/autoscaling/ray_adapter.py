"""Serve custom autoscaling policies: AutoscalingContext -> Signals -> pure policy -> (replicas, state).

Ray 2.60 facts this relies on (ray/serve/config.py, _private/autoscaling_state.py):
- `policy_kwargs` reach only a *class* policy: Serve calls `Cls(**policy_kwargs)` once and then
  `instance(ctx)` every control-loop tick (0.1 s). A plain function gets no kwargs. So the
  policies here are classes; `engine_policy` / `shard_policy` are aliases for the import path.
- `ctx.raw_metrics[key][replica_id]` is the replica's recent time series of what its
  `record_autoscaling_stats()` returned; `ctx.aggregated_metrics[key][replica_id]` is that series
  reduced over look_back_period_s (mean by default). We read the *latest* sample by default
  (fresher on a spike), or the window aggregate with `use_latest=False`.
- `ctx.current_num_replicas` counts RUNNING replicas, `ctx.target_num_replicas` what was ordered:
  the difference is capacity still cold-starting, which the policy does not order twice.
- Serve wraps the returned number with upscaling/downscaling factors, upscale/downscale delays and
  min/max. Our policy has its own hysteresis, so configure upscale_delay_s: 0, downscale_delay_s: 0.

Serve config (cluster/serve_config.yaml), per deployment:
    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      metrics_interval_s: 0.5
      look_back_period_s: 2
      upscale_delay_s: 0
      downscale_delay_s: 0
      policy:
        policy_function: serving.autoscaling.ray_adapter:engine_policy
        policy_kwargs: {target_ongoing_per_replica: 12, ttft_slo_s: 2.0, cold_start_s: 15,
                        downscale_stable_s: 30, on_decision: "serving.metrics:record_autoscaling_decision"}
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Mapping

from serving.autoscaling import decisions
from serving.autoscaling.policy import (Decision, EnginePolicyConfig, PolicyState, ShardPolicyConfig,
                                        decide_engine_replicas, decide_shard_replicas)
from serving.autoscaling.signals import (ENGINE_ARRIVALS_PER_S, ENGINE_COMPLETED_PER_S, ENGINE_PREFILL_TOKENS_WAITING, ENGINE_QUEUE_DEPTH, ENGINE_RUNNING,
                                         ENGINE_TTFT_P90_S, ENGINE_TTFT_P99_S, SHARD_BUSY_FRACTION,
                                         SHARD_TOKENS_PER_S, ShardSignals, Signals)

log = logging.getLogger(__name__)

STATE_KEY = "moe_policy"             # our PolicyState inside Serve's policy_state dict
LAST_DECISION_KEY = "moe_last_decision"
COUNTS_KEY = "moe_decisions_total"   # reason -> count, for this deployment


def _latest(series: Any) -> float | None:
    """Last value of a TimeSeries (list of TimeStampedValue) or a plain number."""
    if series is None:
        return None
    if isinstance(series, (int, float)):
        return float(series)
    try:
        return float(max(series, key=lambda p: p.timestamp).value) if series else None
    except (TypeError, AttributeError):
        return None


def per_replica(ctx: Any, key: str, use_latest: bool = True) -> list[float]:
    """One value per running replica that reported `key` (latest sample, or window aggregate)."""
    if use_latest:
        raw = ctx.raw_metrics or {}
        vals = [_latest(s) for s in (raw.get(key) or {}).values()]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        if vals:
            return vals
    agg = ctx.aggregated_metrics or {}
    return [float(v) for v in (agg.get(key) or {}).values() if v is not None and math.isfinite(float(v))]


def _quantile(vals: list[float], q: float) -> float:
    if not vals:
        return 0.0
    s = sorted(vals)
    return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)] if q > 0 else s[0]


def engine_signals(ctx: Any, use_latest: bool = True) -> Signals:
    """Sum the EngineReplica reports; before any arrive, fall back to Serve's own request counts."""
    queue = per_replica(ctx, ENGINE_QUEUE_DEPTH, use_latest)
    running = per_replica(ctx, ENGINE_RUNNING, use_latest)
    if queue or running:
        q, r = sum(queue), sum(running)
    else:
        q = float(ctx.total_queued_requests or 0.0)
        r = float(ctx.total_running_requests or 0.0)
    last_change = max((t for t in (ctx.last_scale_up_time, ctx.last_scale_down_time) if t), default=None)
    now = float(ctx.current_time)
    return Signals(now=now, running_replicas=int(ctx.current_num_replicas),
                   target_replicas=int(ctx.target_num_replicas), queue_depth=q, running_requests=r,
                   prefill_tokens_waiting=sum(per_replica(ctx, ENGINE_PREFILL_TOKENS_WAITING, use_latest)),
                   # p90 across replicas of each replica's p90: robust to one outlier replica
                   ttft_p90_s=_quantile(per_replica(ctx, ENGINE_TTFT_P90_S, use_latest), 0.9),
                   ttft_p99_s=max(per_replica(ctx, ENGINE_TTFT_P99_S, use_latest), default=0.0),
                   arrivals_per_s=sum(per_replica(ctx, ENGINE_ARRIVALS_PER_S, use_latest)),
                   completed_per_s=sum(per_replica(ctx, ENGINE_COMPLETED_PER_S, use_latest)),
                   seconds_since_last_change=None if last_change is None else max(0.0, now - last_change))


def shard_signals(ctx: Any, use_latest: bool = True) -> ShardSignals:
    last_change = max((t for t in (ctx.last_scale_up_time, ctx.last_scale_down_time) if t), default=None)
    now = float(ctx.current_time)
    return ShardSignals(now=now, running_replicas=int(ctx.current_num_replicas),
                        target_replicas=int(ctx.target_num_replicas),
                        tokens_per_s=sum(per_replica(ctx, SHARD_TOKENS_PER_S, use_latest)),
                        busy_fraction=sum(per_replica(ctx, SHARD_BUSY_FRACTION, use_latest)),
                        seconds_since_last_change=None if last_change is None else max(0.0, now - last_change))


def _bounds_from_ctx(cfg, ctx):
    """Serve's (capacity-adjusted) min/max_replicas are the bounds: set them once, in autoscaling_config."""
    lo = getattr(ctx, "capacity_adjusted_min_replicas", None)
    hi = getattr(ctx, "capacity_adjusted_max_replicas", None)
    if lo is None or hi is None or hi < 1:
        return cfg
    return replace(cfg, min_replicas=int(min(lo, hi)), max_replicas=int(hi))


class _ServePolicy:
    """Shared glue: state in/out of ctx.policy_state, decision recording, the hook."""
    config_cls: type = EnginePolicyConfig

    def __init__(self, *, on_decision: str | None = None, use_latest: bool = True,
                 deployment_label: str | None = None, **config: Any):
        self.config = self.config_cls(**config)
        self.use_latest = use_latest
        self.label = deployment_label
        self.hook = decisions.resolve_hook(on_decision)
        self._warned = False

    def _decide(self, ctx: Any, state: PolicyState) -> Decision:
        raise NotImplementedError

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        self._check_serve_config(ctx)
        policy_state = dict(ctx.policy_state or {})
        d = self._decide(ctx, PolicyState.from_dict(policy_state.get(STATE_KEY)))
        name = self.label or ctx.deployment_name
        rec = decisions.DecisionRecord(deployment=name, desired=d.num_replicas,
                                       current=int(ctx.current_num_replicas),
                                       target=int(ctx.target_num_replicas), reason=d.reason,
                                       time=float(ctx.current_time))
        decisions.record_decision(rec, self.hook)
        counts = dict(policy_state.get(COUNTS_KEY) or {})
        counts[d.reason] = counts.get(d.reason, 0) + 1
        policy_state.update({STATE_KEY: d.new_state.to_dict(), COUNTS_KEY: counts,
                             LAST_DECISION_KEY: {"desired": d.num_replicas, "need": d.desired_raw,
                                                 "current": rec.current, "target": rec.target,
                                                 "reason": d.reason, "time": rec.time}})
        return d.num_replicas, policy_state

    def _check_serve_config(self, ctx: Any) -> None:
        cfg = getattr(ctx, "config", None)
        if self._warned or cfg is None:
            return
        self._warned = True
        if getattr(cfg, "upscale_delay_s", 0) > 0 or getattr(cfg, "downscale_delay_s", 0) > 0:
            log.warning("%s: Serve's upscale_delay_s=%s / downscale_delay_s=%s still apply around this "
                        "policy; set both to 0 (the policy has its own hysteresis)", ctx.deployment_name,
                        cfg.upscale_delay_s, cfg.downscale_delay_s)


class EngineAutoscalingPolicy(_ServePolicy):
    """EngineReplica: queue depth + running, TTFT-aware. policy_kwargs = EnginePolicyConfig fields
    (+ on_decision, use_latest, deployment_label)."""
    config_cls = EnginePolicyConfig

    def _decide(self, ctx, state):
        return decide_engine_replicas(engine_signals(ctx, self.use_latest), _bounds_from_ctx(self.config, ctx), state)


class ShardAutoscalingPolicy(_ServePolicy):
    """ExpertShard deployment: tokens/s routed to its experts. policy_kwargs = ShardPolicyConfig fields."""
    config_cls = ShardPolicyConfig

    def _decide(self, ctx, state):
        return decide_shard_replicas(shard_signals(ctx, self.use_latest), _bounds_from_ctx(self.config, ctx), state)


# Import paths for the Serve config: serving.autoscaling.ray_adapter:engine_policy / :shard_policy
engine_policy = EngineAutoscalingPolicy
shard_policy = ShardAutoscalingPolicy

last_decisions = decisions.last_decisions
set_decision_hook = decisions.set_decision_hook


def autoscaling_config(kind: str, *, min_replicas: int, max_replicas: int, metrics_interval_s: float = 0.5,
                       look_back_period_s: float = 2.0, **policy_kwargs: Any) -> dict[str, Any]:
    """The `autoscaling_config` dict for one deployment (for code paths that build it in Python)."""
    fn = {"engine": "engine_policy", "shard": "shard_policy"}[kind]
    return {"min_replicas": min_replicas, "max_replicas": max_replicas, "initial_replicas": min_replicas,
            "metrics_interval_s": metrics_interval_s, "look_back_period_s": look_back_period_s,
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
            "policy": {"policy_function": f"serving.autoscaling.ray_adapter:{fn}",
                       "policy_kwargs": dict(policy_kwargs)}}


def policy_state_summary(state: Mapping[str, Any]) -> dict[str, Any]:
    """The observable part of a returned policy_state (last decision + counts by reason)."""
    return {"last": state.get(LAST_DECISION_KEY), "counts": state.get(COUNTS_KEY, {})}
