"""Our autoscaling policies, as pure functions: (signals, config, state) -> Decision. No Ray.

The same functions run inside the Serve controller (through ray_adapter) and inside the fleet
simulator (simulator.py), so what the simulator shows is what the cluster does.

Engine policy, one decision:
  1. need = ceil((queue + running) / target_ongoing_per_replica)            # proportional to backlog
     also ceil(prefill_tokens_waiting / target_prefill_tokens_per_replica)  # if enabled
     also ceil(running_replicas * min(ttft_p90 / slo, ttft_boost_max))      # TTFT over SLO, queue non-empty
     also ceil(running * arrivals_per_s / completed_per_s / target_ongoing)  # Little's law on offered load:
          sees demand the admission queue shed, which the backlog term cannot (queues are bounded)
  2. capacity already ordered = target_replicas (running + cold-starting). Upscale only past that,
     so replicas still starting are never ordered twice; cap one step at max_step_up x target.
     With no queue (and no TTFT/surge term firing) upscale only past target x (1 + upscale_deadband).
  3. need in (running, target]  -> hold: "cold_start_pending".
  4. need < target * (1 - hysteresis) held for downscale_stable_s (and no upscale within
     cold_start_s) -> step down to max(need seen in the window, target - downscale_step_frac*target),
     one step every downscale_step_interval_s. Otherwise hold: "hold_hysteresis".
  5. clamp to [min_replicas, max_replicas] ("at_max" / "at_min").
Shard policy: the same machinery with need = ceil(tokens_per_s / target_tokens_per_s_per_replica)
(and busy fraction), per ExpertShard deployment; plan_shard_replicas() splits a shared replica
budget hottest shard first.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from serving.autoscaling.signals import ShardSignals, Signals


class Reason:
    """Why a decision was taken (the `reason` label of the decisions counter)."""
    STEADY = "steady"
    QUEUE_BACKLOG = "queue_backlog"
    PREFILL_BACKLOG = "prefill_backlog"
    TTFT_SLO_BREACH = "ttft_slo_breach"
    ARRIVAL_SURGE = "arrival_surge"
    TOKEN_LOAD = "token_load"
    COLD_START_PENDING = "cold_start_pending"
    HOLD_HYSTERESIS = "hold_hysteresis"
    SCALE_DOWN = "scale_down"
    SCALE_DOWN_IDLE = "scale_down_idle"
    AT_MAX = "at_max"
    AT_MIN = "at_min"
    BUDGET_EXHAUSTED = "budget_exhausted"
    ALL = (STEADY, QUEUE_BACKLOG, PREFILL_BACKLOG, TTFT_SLO_BREACH, ARRIVAL_SURGE, TOKEN_LOAD, COLD_START_PENDING,
           HOLD_HYSTERESIS, SCALE_DOWN, SCALE_DOWN_IDLE, AT_MAX, AT_MIN, BUDGET_EXHAUSTED)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScalingConfig:
    """Knobs shared by the engine and shard policies (bounds, step sizes, hysteresis)."""
    min_replicas: int = 1
    max_replicas: int = 8
    max_step_up: float = 8.0                 # one upscale at most multiplies the target by this
    cold_start_s: float = 10.0               # replica start time: no downscale this soon after an upscale,
                                             # pending orders expire after it when target is unknown
    downscale_stable_s: float = 60.0         # the lower need must hold this long before the first step down
    downscale_step_interval_s: float = 15.0  # then one step per interval while it still holds
    downscale_step_frac: float = 0.25        # a step removes at most this fraction (at least 1 replica)
    hysteresis: float = 0.15                 # need must be < target*(1-hysteresis) to count as "lower"
    upscale_deadband: float = 0.1            # without a backlog, upscale only past target*(1+this)

    def __post_init__(self):
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas}), max >= 1")
        if self.max_step_up < 1 or not 0 < self.downscale_step_frac <= 1 or not 0 <= self.hysteresis < 1:
            raise ValueError("max_step_up >= 1, 0 < downscale_step_frac <= 1, 0 <= hysteresis < 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class EnginePolicyConfig(ScalingConfig):
    target_ongoing_per_replica: float = 12.0        # (queue + running) per replica we aim for (~0.75 x max batch)
    target_prefill_tokens_per_replica: float = 0.0  # 0 disables the prefill-backlog term
    ttft_slo_s: float = 2.0
    ttft_boost_max: float = 2.0                     # TTFT term: running replicas x min(ttft/slo, this)
    surge_deadband: float = 0.2                     # arrival term only when arrivals > completions x (1 + this)

    def __post_init__(self):
        ScalingConfig.__post_init__(self)
        if self.target_ongoing_per_replica <= 0 or self.ttft_slo_s <= 0 or self.ttft_boost_max < 1:
            raise ValueError("target_ongoing_per_replica > 0, ttft_slo_s > 0, ttft_boost_max >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardPolicyConfig(ScalingConfig):
    target_tokens_per_s_per_replica: float = 2000.0
    target_busy_fraction: float = 0.0               # 0 disables the busy-fraction term (e.g. 0.7)

    def __post_init__(self):
        ScalingConfig.__post_init__(self)
        if self.target_tokens_per_s_per_replica <= 0 or not 0 <= self.target_busy_fraction <= 1:
            raise ValueError("target_tokens_per_s_per_replica > 0, 0 <= target_busy_fraction <= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyState:
    """What a policy remembers between decisions (JSON-able through to_dict/from_dict)."""
    last_upscale_t: float | None = None
    last_downscale_t: float | None = None
    down_since: float | None = None          # when need first fell below target*(1-hysteresis)
    down_window_max: int = 0                 # highest need seen since down_since
    pending: tuple[tuple[float, int], ...] = ()   # (ordered_at, n): upscales not yet known to be running

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pending"] = [list(p) for p in self.pending]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "PolicyState":
        if not d:
            return cls()
        return cls(last_upscale_t=d.get("last_upscale_t"), last_downscale_t=d.get("last_downscale_t"),
                   down_since=d.get("down_since"), down_window_max=int(d.get("down_window_max", 0)),
                   pending=tuple((float(t), int(n)) for t, n in d.get("pending", ())))


@dataclass(frozen=True, slots=True)
class Decision:
    num_replicas: int
    reason: str
    new_state: PolicyState = field(default_factory=PolicyState)
    desired_raw: int = 0                     # the need before steps, holds and bounds (for metrics/debug)


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - 1e-9))


def _ordered(running: int, target: int | None, state: PolicyState, cfg: ScalingConfig, now: float
             ) -> tuple[int, PolicyState]:
    """Replicas already ordered (running + cold-starting). Uses `target` when the caller knows it."""
    if target is not None:
        return max(target, running), replace(state, pending=())
    live = tuple(p for p in state.pending if now - p[0] < cfg.cold_start_s)
    return running + sum(n for _, n in live), replace(state, pending=live)


def _decide(need: int, up_reason: str, load: float, running: int, target: int | None, now: float,
            cfg: ScalingConfig, state: PolicyState, backlog: bool = True) -> Decision:
    """The shared up-fast / down-slow state machine around a proportional `need`."""
    ordered, st = _ordered(running, target, state, cfg, now)
    lo, hi = cfg.min_replicas, cfg.max_replicas
    need_c = min(max(need, lo), hi)
    current = min(max(ordered, lo), hi) if ordered else lo

    # Upscale: past what is already ordered, proportional, capped per step and by max.
    if need_c > ordered and (backlog or need_c > ordered * (1 + cfg.upscale_deadband)):
        new = min(need_c, max(ordered + 1, _ceil(max(ordered, 1) * cfg.max_step_up)))
        reason = Reason.AT_MAX if need > hi and new == hi else up_reason
        pending = st.pending + ((now, new - ordered),) if target is None else ()
        return Decision(new, reason, replace(st, last_upscale_t=now, down_since=None, down_window_max=0,
                                             pending=pending), need)
    if ordered > hi:      # bounds tightened under us
        return Decision(hi, Reason.AT_MAX, replace(st, down_since=None, down_window_max=0), need)
    if ordered < lo:
        return Decision(lo, Reason.AT_MIN, replace(st, down_since=None, down_window_max=0), need)

    # Need is covered by replicas still starting: hold, don't order them twice.
    if need_c > ordered:     # inside the upscale deadband, no backlog: creeping load, wait
        return Decision(current, Reason.STEADY, replace(st, down_since=None, down_window_max=0), need)
    if need_c > running and ordered > running:
        return Decision(current, Reason.COLD_START_PENDING, replace(st, down_since=None, down_window_max=0), need)

    # Not clearly lower (inside the hysteresis band), or at the floor: steady.
    if need_c >= current * (1 - cfg.hysteresis) or current <= lo:
        reason = (Reason.AT_MAX if need > hi and current >= hi else
                  Reason.AT_MIN if need < current and current <= lo else Reason.STEADY)
        return Decision(current, reason, replace(st, down_since=None, down_window_max=0), need)

    # Lower: wait for it to hold (and for recent upscales to have had their chance), then step down.
    down_since = st.down_since if st.down_since is not None else now
    window_max = max(st.down_window_max if st.down_since is not None else 0, need_c)
    st = replace(st, down_since=down_since, down_window_max=window_max)
    recently_up = st.last_upscale_t is not None and now - st.last_upscale_t < cfg.cold_start_s
    stable = now - down_since >= cfg.downscale_stable_s
    step_ok = st.last_downscale_t is None or now - st.last_downscale_t >= cfg.downscale_step_interval_s
    if recently_up or not stable or not step_ok:
        return Decision(current, Reason.HOLD_HYSTERESIS, st, need)
    step = max(1, math.floor(current * cfg.downscale_step_frac))
    new = max(window_max, current - step, lo)
    return Decision(new, Reason.SCALE_DOWN_IDLE if load <= 0 else Reason.SCALE_DOWN,
                    replace(st, last_downscale_t=now, down_window_max=need_c), need)


def engine_need(s: Signals, cfg: EnginePolicyConfig) -> tuple[int, str]:
    """Replicas the engine load calls for, and which term drove it."""
    terms = [(_ceil((s.queue_depth + s.running_requests) / cfg.target_ongoing_per_replica), Reason.QUEUE_BACKLOG)]
    if cfg.target_prefill_tokens_per_replica > 0:
        terms.append((_ceil(s.prefill_tokens_waiting / cfg.target_prefill_tokens_per_replica), Reason.PREFILL_BACKLOG))
    if s.ttft_p90_s > cfg.ttft_slo_s and s.queue_depth > 0:
        boost = min(s.ttft_p90_s / cfg.ttft_slo_s, cfg.ttft_boost_max)
        terms.append((_ceil(max(s.running_replicas, 1) * boost), Reason.TTFT_SLO_BREACH))
    if (s.completed_per_s > 0 and s.running_requests > 0
            and s.arrivals_per_s > s.completed_per_s * (1 + cfg.surge_deadband)):
        # concurrency needed = concurrency now x offered/served rate
        terms.append((_ceil(s.running_requests * s.arrivals_per_s / s.completed_per_s
                            / cfg.target_ongoing_per_replica), Reason.ARRIVAL_SURGE))
    return max(terms, key=lambda t: t[0])    # ties keep the first (queue_backlog)


def decide_engine_replicas(signals: Signals, config: EnginePolicyConfig,
                           state: PolicyState | None = None) -> Decision:
    """EngineReplica: scale on queue depth + running (proportional), boosted on TTFT over SLO."""
    need, reason = engine_need(signals, config)
    return _decide(need, reason, signals.queue_depth + signals.running_requests, signals.running_replicas,
                   signals.target_replicas, signals.now, config, state or PolicyState(),
                   backlog=signals.queue_depth > 0 or reason != Reason.QUEUE_BACKLOG)


def shard_need(s: ShardSignals, cfg: ShardPolicyConfig) -> int:
    need = _ceil(s.tokens_per_s / cfg.target_tokens_per_s_per_replica)
    if cfg.target_busy_fraction > 0:
        need = max(need, _ceil(s.busy_fraction / cfg.target_busy_fraction))
    return need


def decide_shard_replicas(signals: ShardSignals, config: ShardPolicyConfig,
                          state: PolicyState | None = None) -> Decision:
    """One ExpertShard deployment: replicas proportional to the tokens/s routed to its experts."""
    return _decide(shard_need(signals, config), Reason.TOKEN_LOAD, signals.tokens_per_s,
                   signals.running_replicas, signals.target_replicas, signals.now, config, state or PolicyState(),
                   backlog=False)


def plan_shard_replicas(shards: Mapping[str, ShardSignals], config: ShardPolicyConfig,
                        states: Mapping[str, PolicyState] | None = None,
                        total_budget: int | None = None) -> dict[str, Decision]:
    """Decide every shard; if upscales exceed `total_budget` replicas, the hottest shards
    (highest tokens/s per ordered replica) get theirs first, the rest hold ("budget_exhausted")."""
    states = states or {}
    out = {k: decide_shard_replicas(s, config, states.get(k)) for k, s in shards.items()}
    if total_budget is None or sum(d.num_replicas for d in out.values()) <= total_budget:
        return out

    def held(k: str) -> int:
        s = shards[k]
        return max(s.target_replicas if s.target_replicas is not None else s.running_replicas, s.running_replicas)

    used = sum(min(out[k].num_replicas, held(k)) for k in out)
    heat = sorted(out, key=lambda k: -shards[k].tokens_per_s / max(1, held(k)))
    for k in heat:
        d, h = out[k], held(k)
        if d.num_replicas <= h:
            continue
        grant = max(0, min(d.num_replicas - h, total_budget - used))
        used += grant
        if grant < d.num_replicas - h:
            st = states.get(k) or PolicyState()
            out[k] = Decision(h + grant, Reason.BUDGET_EXHAUSTED,
                              d.new_state if grant else st, d.desired_raw)
    return out
