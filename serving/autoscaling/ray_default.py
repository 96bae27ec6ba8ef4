"""Ray Serve 2.60's default autoscaling, mirrored as pure functions (the simulator's baseline). No Ray.

Mirrors ray/serve/autoscaling_policy.py line for line:
  replica_queue_length_autoscaling_policy  -> ray_default_desired()
  _apply_autoscaling_config (cold-start fast path, _apply_scaling_factors, _apply_delay_logic)
  + AutoscalingState.apply_bounds          -> serve_wrap()
serve_wrap() is also what Serve wraps around *our* policy function, so the simulator runs both
policies through it, each with its own Serve config. tests/test_ray_adapter.py checks the mirror
against Ray's own functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Ray's internal policy-state keys (ray.serve._private.constants).
DECISION_COUNTER_KEY = "__decision_counters"
DECISION_TIMESTAMP_KEY = "__decision_timestamp"
_EPS = 1e-6   # _DELAY_ELAPSED_EPS_S


@dataclass(frozen=True, kw_only=True, slots=True)
class ServeAutoscalingConfig:
    """The AutoscalingConfig fields that shape decisions; defaults are Ray 2.60's."""
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    metrics_interval_s: float = 10.0            # replicas push every this many seconds
    look_back_period_s: float = 30.0            # window the controller averages over
    smoothing_factor: float = 1.0
    upscale_smoothing_factor: float | None = None
    downscale_smoothing_factor: float | None = None
    upscaling_factor: float | None = None
    downscaling_factor: float | None = None
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    record_interval_factor: float = 0.2         # RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR

    def get_upscaling_factor(self) -> float:
        return self.upscaling_factor or self.upscale_smoothing_factor or self.smoothing_factor

    def get_downscaling_factor(self) -> float:
        return self.downscaling_factor or self.downscale_smoothing_factor or self.smoothing_factor

    @property
    def record_interval_s(self) -> float:
        """How often a replica samples its metrics (replica.py: min(look_back*factor, metrics_interval))."""
        return min(self.look_back_period_s * self.record_interval_factor, self.metrics_interval_s)


def ray_default_desired(total_num_requests: float, current_num_replicas: int, target_num_replicas: int,
                        config: ServeAutoscalingConfig) -> float:
    """replica_queue_length_autoscaling_policy (with its own cold-start guard)."""
    cold = _cold_start_replicas(total_num_requests, current_num_replicas, target_num_replicas, config)
    if cold is not None:
        return cold
    if current_num_replicas == 0:
        return target_num_replicas
    target_num_requests = config.target_ongoing_requests * current_num_replicas
    error_ratio = total_num_requests / target_num_requests
    return current_num_replicas * error_ratio


def _cold_start_replicas(total_num_requests: float, current: int, target: int,
                         config: ServeAutoscalingConfig) -> int | None:
    if current == 0 and total_num_requests > 0:
        return max(math.ceil(1 * config.get_upscaling_factor()), target)
    return None


def apply_scaling_factors(desired: float, current: int, config: ServeAutoscalingConfig) -> int:
    if current == 0:
        return math.ceil(desired)
    delta = desired - current
    factor = config.get_upscaling_factor() if delta > 0 else config.get_downscaling_factor()
    scaled = math.ceil(current + factor * delta)
    if math.ceil(float(desired)) < current and scaled == current:
        scaled -= 1
    return scaled


def apply_delay_logic(desired: int, curr_target: int, config: ServeAutoscalingConfig,
                      policy_state: dict[str, Any], now: float) -> tuple[int, dict[str, Any]]:
    decision = curr_target
    counter = policy_state.get(DECISION_COUNTER_KEY, 0)
    stamp = policy_state.get(DECISION_TIMESTAMP_KEY, None)
    if desired > curr_target:
        if counter < 0:
            counter, stamp = 0, None
        counter += 1
        if stamp is None:
            stamp = now
        if now - stamp + _EPS >= config.upscale_delay_s:
            counter, stamp, decision = 0, None, desired
    elif desired < curr_target:
        if counter > 0:
            counter, stamp = 0, None
        counter -= 1
        if curr_target == 1:
            delay = config.downscale_to_zero_delay_s if config.downscale_to_zero_delay_s is not None \
                else config.downscale_delay_s
        else:
            delay = config.downscale_delay_s
            desired = max(1, desired)
        if stamp is None:
            stamp = now
        if now - stamp + _EPS >= delay:
            counter, stamp, decision = 0, None, desired
    else:
        counter, stamp = 0, None
    policy_state[DECISION_COUNTER_KEY] = counter
    policy_state[DECISION_TIMESTAMP_KEY] = stamp
    return decision, policy_state


def serve_wrap(desired: float, *, current_num_replicas: int, target_num_replicas: int, total_num_requests: float,
               config: ServeAutoscalingConfig, policy_state: dict[str, Any], now: float
               ) -> tuple[int, dict[str, Any]]:
    """What Serve does with a policy's answer: cold-start fast path, factors, delays, then bounds."""
    cold = _cold_start_replicas(total_num_requests, current_num_replicas, target_num_replicas, config)
    if cold is not None:
        return _bound(cold, config), policy_state
    internal = {DECISION_COUNTER_KEY: policy_state.get(DECISION_COUNTER_KEY, 0),
                DECISION_TIMESTAMP_KEY: policy_state.get(DECISION_TIMESTAMP_KEY, None)}
    scaled = apply_scaling_factors(desired, current_num_replicas, config)
    if current_num_replicas == 0 and scaled > 0:
        return _bound(scaled, config), policy_state
    final, internal = apply_delay_logic(max(0, scaled), target_num_replicas, config, internal, now)
    out = dict(policy_state)
    out.update(internal)
    return _bound(final, config), out


def _bound(n: int | float, config: ServeAutoscalingConfig) -> int:
    n = math.ceil(n) if isinstance(n, float) else n
    return max(config.min_replicas, min(config.max_replicas, n))
