"""Automatic expert rebalancing (EPLB): when the tokens routed over a window leave the expert shards
unbalanced, a load-aware placement built from that window replaces the current one.

Every MoE layer of a step waits for its busiest shard, so what a placement costs is
`step_imbalance`: the sum over layers of the busiest shard's tokens over the sum of the mean
shard's (1.0: every layer balanced). Every `interval_s` the owner (the MetricsHub:
serving/deployments/metrics_hub.py) hands `AutoRebalancer.tick` the cumulative tokens routed to each
expert; the tick takes the window since the previous tick and asks `decide`:
  1. a window with fewer than `min_window_tokens` routed (token, expert) pairs in a MoE layer on
     average is not judged (too little traffic to say anything);
  2. the current placement's predicted imbalance over the window must exceed `trigger_imbalance`;
  3. the load-aware plan for that window (Placement.build: the hottest experts get `redundant`
     copies, then copies go greedily to the least-loaded shard) must cut it by `min_gain` (a
     fraction of the excess over 1.0), else the shards would churn for nothing.
A published plan reaches the engines and shards through placement_sync (engines switch within
~1 s, shards load only the experts they newly serve); in-flight requests keep their tokens, since
the math is the same whichever copy serves a token. It is the same plan as `moe-serve placement
--strategy load_aware --apply`, taken without an operator. Plain objects: no Ray, no clock of
its own (the owner calls `tick` every `interval_s`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from serving.model.config import MoEConfig
from serving.parallel.placement import Placement

Load = Mapping[int, Sequence[float]]            # MoE layer id -> tokens routed to each expert


@dataclass(frozen=True, slots=True)
class RebalancePolicy:
    interval_s: float = 30.0          # how often a window is judged
    min_window_tokens: int = 4096     # routed (token, expert) pairs per MoE layer, on average, to judge one
    trigger_imbalance: float = 1.10   # the current placement's step_imbalance over the window above which ...
    min_gain: float = 0.25            # ... a plan is taken if it removes at least this share of the excess
    redundant: int | None = None      # extra expert copies per layer (None: one per shard)

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.min_window_tokens < 1:
            raise ValueError(f"interval_s must be > 0 and min_window_tokens >= 1, got {self}")
        if self.trigger_imbalance < 1.0 or not 0.0 < self.min_gain <= 1.0:
            raise ValueError(f"trigger_imbalance must be >= 1 and min_gain in (0, 1], got {self}")
        if self.redundant is not None and self.redundant < 0:
            raise ValueError(f"redundant must be None or >= 0, got {self.redundant}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "RebalancePolicy":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"auto_rebalance: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True, slots=True)
class RebalanceDecision:
    plan: Placement | None            # the placement to publish; None: keep the current one
    before: float                     # step_imbalance of the current placement over the window
    after: float                      # ... of the plan (= before when none was built)
    window_tokens: float              # routed (token, expert) pairs per MoE layer in the window, on average
    reason: str                       # rebalanced | quiet | balanced | no_gain


def step_imbalance(placement: Placement, load: Load) -> float:
    """sum over layers of the busiest shard's predicted tokens / sum of the mean shard's."""
    per_layer = placement.predicted_shard_load(load)
    busiest = sum(max(per) for per in per_layer.values())
    mean = sum(sum(per) / len(per) for per in per_layer.values())
    return busiest / mean if mean > 0 else 1.0


def decide(policy: RebalancePolicy, config: MoEConfig, current: Placement, window: Load) -> RebalanceDecision:
    layers = [layer for layer in current.layers if layer in window]
    tokens = sum(sum(window[layer]) for layer in layers) / max(len(current.layers), 1)
    if tokens < policy.min_window_tokens:
        return RebalanceDecision(None, 1.0, 1.0, tokens, "quiet")
    load = {layer: [float(n) for n in window[layer]] for layer in layers}
    before = step_imbalance(current, load)
    if before <= policy.trigger_imbalance:
        return RebalanceDecision(None, before, before, tokens, "balanced")
    full = {layer: load.get(layer, [1.0] * config.num_experts) for layer in current.layers}
    plan = Placement.build(config, current.num_shards, "load_aware", load=full, redundant=policy.redundant)
    after = step_imbalance(plan, load)
    if before - after < policy.min_gain * (before - 1.0):
        return RebalanceDecision(None, before, after, tokens, "no_gain")
    return RebalanceDecision(plan, before, after, tokens, "rebalanced")


class LoadWindow:
    """Cumulative routed-token counts -> the counts since the previous call (the first call: all)."""

    def __init__(self) -> None:
        self._last: dict[int, list[float]] = {}

    def advance(self, cumulative: Load) -> dict[int, list[float]]:
        window = {}
        for layer, counts in cumulative.items():
            last = self._last.get(layer, [0.0] * len(counts))
            # a counter that went down was reset (a replica's series dropped): count it from zero
            window[layer] = [c - p if c >= p else c for c, p in zip(counts, last)]
        self._last = {layer: list(counts) for layer, counts in cumulative.items()}
        return window


class AutoRebalancer:
    """What the MetricsHub runs every `policy.interval_s`: reads the routed-token counters, judges the
    window since the last tick, publishes a better placement if `decide` finds one.

    read_load() -> Load (cumulative counters); current() -> the placement in force;
    publish(plan) -> the published placement (its version set)."""

    def __init__(self, policy: RebalancePolicy, config: MoEConfig, read_load: Callable[[], Load],
                 current: Callable[[], Placement], publish: Callable[[Placement], Placement]):
        self.policy, self.config = policy, config
        self.read_load, self.current, self.publish = read_load, current, publish
        self.window = LoadWindow()
        self.window.advance(read_load())          # what was routed before we started is not a window
        self.last: RebalanceDecision | None = None
        self.in_force: Placement | None = None   # the placement in force after the last tick

    def tick(self) -> RebalanceDecision:
        self.in_force = self.current()
        decision = decide(self.policy, self.config, self.in_force, self.window.advance(self.read_load()))
        if decision.plan is not None:
            self.in_force = self.publish(decision.plan)
            decision = RebalanceDecision(self.in_force, decision.before, decision.after,
                                         decision.window_tokens, decision.reason)
        self.last = decision
        return decision
