"""Fleet simulator: replay a trace against a fleet of engine replicas driven by THE SAME policy code.

A fluid, fixed-tick model (dt_s, default 0.25 s), not per-token events, so 1,000 GPUs x 40 min runs
in about a second:
  * replica = 1 GPU. Ordered replicas cold-start for `Calibration.replica_cold_start_s`, then serve.
    GPU-hours bill every ordered replica (starting or running). Scale-down stops starting replicas
    first (as Serve does); a stopped running replica's requests finish elsewhere (graceful drain).
  * admission: a bounded FIFO queue of `queue_per_replica` x running replicas; arrivals beyond it
    are shed (a shed request is an SLO miss). Admitted requests are never dropped.
  * service: the fleet acts as one pool (power-of-two routing keeps replicas level) with
    running x max_batch slots. At per-replica batch B a request holds a slot for
    Calibration.service_s(B) = prefill + output_tokens x decode_step_s(B), so R running requests
    finish at R / service_s(B) per second. Freed slots take queued requests FIFO; a request's TTFT is
    its queue wait (interpolated inside the tick) + prefill + one decode step.
  * what each policy sees mirrors Serve: replicas sample their metrics every record_interval_s and
    push every metrics_interval_s; Ray's default policy reads the look-back-window mean of ongoing
    requests (running + queued), our adapter reads each replica's latest sample. Both answers go
    through serve_wrap(), Serve's own factors/delays/bounds, each with its own Serve config.
Token lengths are the calibration's means (fluid). Everything is deterministic for a given trace.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from serving.autoscaling.calibration import Calibration
from serving.autoscaling.policy import EnginePolicyConfig, PolicyState, decide_engine_replicas
from serving.autoscaling.ray_default import ServeAutoscalingConfig, ray_default_desired, serve_wrap
from serving.autoscaling.signals import Signals
from serving.autoscaling.traces import Trace, build_trace


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicySpec:
    """A policy under test: `ours` (decide_engine_replicas) or `ray` (Ray's default), plus the Serve
    autoscaling_config it runs under."""
    name: str
    kind: str                                  # "ours" | "ray"
    serve: ServeAutoscalingConfig
    engine: EnginePolicyConfig | None = None
    ttft_window_s: float = 5.0                 # window of the replicas' ttft_p90_s / rate reports


@dataclass(frozen=True, kw_only=True, slots=True)
class FleetConfig:
    gpus: int = 1000                          # max engine replicas (1 GPU each)
    min_replicas: int = 1
    initial_replicas: int | None = None       # default: what the first second's load needs at 75% batch
    queue_per_replica: int = 32               # admission bound (waiting requests per running replica)
    ttft_slo_s: float = 2.0
    drain_s: float = 300.0                    # after the trace: no arrivals, run until the queue empties


def our_policy(fleet: FleetConfig, cal: Calibration, **overrides: Any) -> PolicySpec:
    """Our policy with the Serve config we recommend (fast metrics, Serve delays off)."""
    eng = EnginePolicyConfig(min_replicas=fleet.min_replicas, max_replicas=fleet.gpus,
                             target_ongoing_per_replica=0.75 * cal.max_batch, ttft_slo_s=fleet.ttft_slo_s,
                             cold_start_s=cal.replica_cold_start_s, downscale_stable_s=60.0,
                             downscale_step_interval_s=15.0, downscale_step_frac=0.25, max_step_up=8.0)
    eng = replace(eng, **overrides)
    serve = ServeAutoscalingConfig(min_replicas=fleet.min_replicas, max_replicas=fleet.gpus,
                                   metrics_interval_s=0.5, look_back_period_s=2.0,
                                   upscale_delay_s=0.0, downscale_delay_s=0.0)
    return PolicySpec(name="ours", kind="ours", serve=serve, engine=eng)


def ray_default_policy(fleet: FleetConfig, name: str = "ray_default", **serve_overrides: Any) -> PolicySpec:
    """Ray Serve 2.60's default policy with Ray's default AutoscalingConfig (only the bounds set)."""
    serve = replace(ServeAutoscalingConfig(min_replicas=fleet.min_replicas, max_replicas=fleet.gpus),
                    **serve_overrides)
    return PolicySpec(name=name, kind="ray", serve=serve)


@dataclass
class SimResult:
    policy: str
    metrics: dict[str, float]
    timeline: dict[str, np.ndarray] = field(repr=False)     # per second: t, arrivals, shed, replicas, ...
    changes: list[tuple[float, int, int, str]] = field(default_factory=list, repr=False)  # (t, from, to, reason)


class _MetricPipe:
    """Replica metric samples as the controller sees them (record every r s, push every p s)."""

    def __init__(self, record_s: float, push_s: float, look_back_s: float):
        self.record_s, self.push_s, self.look_back_s = record_s, push_s, look_back_s
        self.samples: deque[tuple[float, dict[str, float]]] = deque()
        self.next_record = 0.0
        self.visible_until = -1.0

    def tick(self, t: float, snapshot) -> None:
        if t + 1e-9 >= self.next_record:
            self.samples.append((t, snapshot()))
            self.next_record += self.record_s
        self.visible_until = math.floor((t + 1e-9) / self.push_s) * self.push_s
        while self.samples and self.samples[0][0] < self.visible_until - self.look_back_s - self.push_s:
            self.samples.popleft()

    def latest(self) -> dict[str, float] | None:
        last = None
        for ts, s in self.samples:
            if ts > self.visible_until + 1e-9:
                break
            last = s
        return last

    def window_mean(self, key: str) -> float:
        vals = [s[key] for ts, s in self.samples
                if self.visible_until - self.look_back_s < ts <= self.visible_until + 1e-9]
        return sum(vals) / len(vals) if vals else 0.0


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    if len(values) == 0 or weights.sum() <= 0:
        return 0.0
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cw = np.cumsum(w)
    return float(v[min(len(v) - 1, int(np.searchsorted(cw, q * cw[-1])))])


def simulate(trace: Trace, spec: PolicySpec, cal: Calibration, fleet: FleetConfig) -> SimResult:
    dt = trace.dt_s
    n_trace = len(trace.arrivals)
    n_total = n_trace + int(fleet.drain_s / dt)
    mb = cal.max_batch
    first_rate = float(trace.arrivals[: max(1, int(1 / dt))].sum()) / max(dt, min(1.0, n_trace * dt))
    init = fleet.initial_replicas or max(fleet.min_replicas, math.ceil(
        first_rate * cal.service_s(0.75 * mb) / (0.75 * mb)))
    init = min(max(init, fleet.min_replicas), fleet.gpus)

    running = init                                   # replicas serving
    starting: deque[list[float]] = deque()           # [ready_at, n]
    n_starting = 0
    # start in steady state for the first second's load (no empty-fleet transient)
    R = min(init * mb, first_rate * cal.service_s(min(mb, max(1.0, 0.75 * mb))))   # requests in batch slots
    queue: deque[list[float]] = deque()              # [arrival_t, count] FIFO
    Q = 0.0
    shed = served_w = 0.0
    ttft_v: list[float] = []
    ttft_w: list[float] = []
    recent: deque[tuple[float, float, float, float, float]] = deque()   # (t, ttft, w, offered, done)
    gpu_s = 0.0
    state = PolicyState()
    serve_state: dict[str, Any] = {}
    target = running
    pipe = _MetricPipe(spec.serve.record_interval_s, spec.serve.metrics_interval_s, spec.serve.look_back_period_s)
    win = spec.ttft_window_s
    events = dict((label, t) for label, t in trace.events)
    first_up_after_spike = None
    spike_t = events.get("spike start")
    per_s = max(1, int(round(1 / dt)))
    tl = {k: np.zeros(math.ceil(n_total / per_s)) for k in
          ("arrivals", "shed", "replicas", "starting", "target", "queue", "running_requests", "ttft_p99_s")}
    changes: list[tuple[float, int, int, str]] = []

    def snapshot() -> dict[str, float]:
        # per-replica reports summed over the fleet (what the adapter sums)
        while recent and recent[0][0] < t - win:
            recent.popleft()
        vals = np.array([r[1] for r in recent if r[2] > 0])
        wts = np.array([r[2] for r in recent if r[2] > 0])
        span = min(win, max(dt, t + dt))
        return {"queue_depth": Q, "running": R, "ongoing": Q + R,
                "ttft_p90_s": _weighted_quantile(vals, wts, 0.9) if len(vals) else 0.0,
                "arrivals_per_s": sum(r[3] for r in recent) / span,
                "completed_per_s": sum(r[4] for r in recent) / span}

    for i in range(n_total):
        t = i * dt
        # 1. cold starts that finished
        while starting and starting[0][0] <= t + 1e-9:
            running += int(starting[0][1])
            n_starting -= int(starting[0][1])
            starting.popleft()
        # 2. the control loop
        pipe.tick(t, snapshot)
        if spec.kind == "ours":
            snap = pipe.latest() or {"queue_depth": 0.0, "running": 0.0, "ttft_p90_s": 0.0,
                                     "arrivals_per_s": 0.0, "completed_per_s": 0.0, "ongoing": 0.0}
            sig = Signals(now=t, running_replicas=running, target_replicas=target,
                          queue_depth=snap["queue_depth"], running_requests=snap["running"],
                          prefill_tokens_waiting=snap["queue_depth"] * cal.prompt_tokens_mean,
                          ttft_p90_s=snap["ttft_p90_s"], arrivals_per_s=snap["arrivals_per_s"],
                          completed_per_s=snap["completed_per_s"])
            d = decide_engine_replicas(sig, spec.engine, state)
            state = d.new_state
            desired: float = d.num_replicas
            reason = d.reason
            total_requests = snap["ongoing"]
        else:
            total_requests = pipe.window_mean("ongoing")
            desired = ray_default_desired(total_requests, running, target, spec.serve)
            reason = "ray_default"
        new_target, serve_state = serve_wrap(desired, current_num_replicas=running, target_num_replicas=target,
                                             total_num_requests=total_requests, config=spec.serve,
                                             policy_state=serve_state, now=t)
        if new_target > target and spike_t is not None and t >= spike_t and first_up_after_spike is None:
            first_up_after_spike = t - spike_t
        if new_target != target:
            changes.append((t, target, new_target, reason))
        target = new_target
        ordered = running + n_starting
        if target > ordered:
            starting.append([t + cal.replica_cold_start_s, target - ordered])
            n_starting += target - ordered
        elif target < ordered:
            k = ordered - target
            while k and starting:                       # starting replicas go first
                take = min(k, int(starting[-1][1]))
                starting[-1][1] -= take
                n_starting -= take
                k -= take
                if starting[-1][1] <= 0:
                    starting.pop()
            running -= k
        # 3. arrivals through admission
        a = float(trace.arrivals[i]) if i < n_trace else 0.0
        cap = running * fleet.queue_per_replica
        admit = min(a, max(0.0, cap - Q))
        shed += a - admit
        if admit > 0:
            queue.append([t + dt / 2, admit])
            Q += admit
        # 4. service: running requests finish, freed slots take the queue FIFO
        done = 0.0
        if running > 0:
            B = R / running
            if R > 0:
                done = min(R, R * dt / cal.service_s(max(B, 1.0)))
                R -= done
            take = min(Q, max(0.0, running * mb - R))
            if take > 0:
                first_tok = cal.first_token_s(min(mb, (R + take) / running))
                pos, tick_ttft = 0.0, []
                remaining = take
                while remaining > 1e-12 and queue:
                    arr, c = queue[0]
                    c_take = min(c, remaining)
                    t_dq = t + dt * (pos + c_take / 2) / take
                    tt = max(0.0, t_dq - arr) + first_tok
                    ttft_v.append(tt)
                    ttft_w.append(c_take)
                    tick_ttft.append((tt, c_take))
                    pos += c_take
                    remaining -= c_take
                    if c_take >= c - 1e-12:
                        queue.popleft()
                    else:
                        queue[0][1] = c - c_take
                Q = max(0.0, Q - take)
                R += take
                served_w += take
                for tt, w in tick_ttft:
                    recent.append((t, tt, w, 0.0, 0.0))
        recent.append((t, 0.0, 0.0, a, done))
        if i < n_trace:
            gpu_s += (running + n_starting) * dt
        j = i // per_s
        tl["arrivals"][j] += a
        tl["shed"][j] += a - admit
        tl["replicas"][j] = running
        tl["starting"][j] = n_starting
        tl["target"][j] = target
        tl["queue"][j] = Q
        tl["running_requests"][j] = R
        if i >= n_trace and Q <= 1e-9 and R <= 1e-6:
            n_total = i + 1
            break

    v, w = np.asarray(ttft_v), np.asarray(ttft_w)
    total = float(trace.arrivals.sum())
    within = float(w[v <= fleet.ttft_slo_s].sum()) if len(v) else 0.0
    secs = math.ceil(n_total / per_s)
    timeline = {k: a[:secs] for k, a in tl.items()}
    timeline["t"] = np.arange(secs, dtype=float)
    metrics = {
        "slo_attainment": within / total if total else 1.0,
        "shed_ratio": shed / total if total else 0.0,
        "ttft_p50_s": _weighted_quantile(v, w, 0.5),
        "ttft_p99_s": _weighted_quantile(v, w, 0.99),
        "gpu_hours": gpu_s / 3600.0,
        "requests": total,
        "served": served_w,
        "shed": shed,
        "unserved": max(0.0, Q),
        "initial_replicas": float(init),
        "peak_replicas": float(timeline["replicas"].max()),
        "final_replicas": float(timeline["replicas"][min(len(timeline["replicas"]) - 1, int(n_trace * dt) - 1)]),
        "seconds_to_first_upscale": -1.0 if first_up_after_spike is None else first_up_after_spike,
        "scale_events": float(len(changes)),
    }
    return SimResult(spec.name, metrics, timeline, changes)


def compare(trace: Trace, cal: Calibration, fleet: FleetConfig, specs: list[PolicySpec] | None = None
            ) -> dict[str, SimResult]:
    specs = specs or [our_policy(fleet, cal), ray_default_policy(fleet)]
    return {s.name: simulate(trace, s, cal, fleet) for s in specs}


def plot(results: dict[str, SimResult], trace: Trace, path: str | Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    first = next(iter(results.values())).timeline
    axes[0].plot(first["t"], first["arrivals"], color="black", lw=1, label="offered")
    for name, r in results.items():
        axes[0].plot(r.timeline["t"], r.timeline["shed"], lw=1, label=f"shed ({name})")
        axes[1].plot(r.timeline["t"], r.timeline["replicas"], lw=1.5, label=f"running ({name})")
        axes[1].plot(r.timeline["t"], r.timeline["target"], lw=1, ls="--", label=f"ordered ({name})")
        axes[2].plot(r.timeline["t"], r.timeline["queue"], lw=1, label=name)
        axes[3].plot(r.timeline["t"], r.timeline["running_requests"], lw=1, label=name)
    axes[0].set_ylabel("requests / s")
    axes[1].set_ylabel("engine replicas (GPUs)")
    axes[2].set_ylabel("queued requests")
    axes[3].set_ylabel("running requests")
    axes[3].set_xlabel("seconds")
    for label, t in trace.events:
        for ax in axes:
            ax.axvline(t, color="grey", ls=":", lw=1)
    for ax in axes:
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title(title or f"{trace.name} trace")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


# ---- CLI pieces (wired into `moe-serve simulate` by serving/cli.py) ----------------------------------
def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="spike", help="spike | diurnal | poisson | FILE.csv (column: timestamp)")
    p.add_argument("--gpus", type=int, default=1000, help="fleet size = max engine replicas (1 GPU each)")
    p.add_argument("--calibration", type=Path, default=None, help="calibration JSON (default cluster/calibration.json)")
    p.add_argument("--ttft-slo-s", type=float, default=2.0)
    p.add_argument("--duration-s", type=float, default=None, help="trace length (spike: 1/4 warm-up, 1/4 spike)")
    p.add_argument("--spike-factor", type=float, default=10.0)
    p.add_argument("--peak-utilization", type=float, default=0.8,
                   help="the trace's peak needs this fraction of the fleet (at 75%% batch); sets its base rate")
    p.add_argument("--base-rps", type=float, default=None, help="override the trace's base rate (requests/s)")
    p.add_argument("--queue-per-replica", type=int, default=32, help="admission bound per running replica")
    p.add_argument("--cold-start-s", type=float, default=None, help="override the calibration's replica start")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--dt-s", type=float, default=0.25, help="simulation tick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default="ours,ray_default",
                   help="comma list of ours, ray_default, ray_tuned (Ray's policy, target_ongoing_requests=0.75 x max batch)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG timeline")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _specs(names: str, fleet: FleetConfig, cal: Calibration) -> list[PolicySpec]:
    out = []
    for n in (x.strip() for x in names.split(",") if x.strip()):
        if n == "ours":
            out.append(our_policy(fleet, cal))
        elif n == "ray_default":
            out.append(ray_default_policy(fleet))
        elif n == "ray_tuned":
            out.append(ray_default_policy(fleet, "ray_tuned", target_ongoing_requests=0.75 * cal.max_batch))
        else:
            raise ValueError(f"unknown policy {n!r}: ours | ray_default | ray_tuned")
    return out


def run_simulation(args: argparse.Namespace) -> dict[str, Any]:
    cal = Calibration.load(args.calibration) if args.calibration else Calibration.default()
    if args.cold_start_s is not None:
        cal = replace(cal, replica_cold_start_s=args.cold_start_s)
    fleet = FleetConfig(gpus=args.gpus, min_replicas=args.min_replicas, queue_per_replica=args.queue_per_replica,
                        ttft_slo_s=args.ttft_slo_s)
    peak = {"spike": args.spike_factor, "diurnal": 1.6, "poisson": 1.0}.get(args.trace, 1.0)
    base = args.base_rps or args.peak_utilization * args.gpus * cal.replica_rps(0.75 * cal.max_batch) / peak
    trace = build_trace(args.trace, base_rps=base, dt_s=args.dt_s, duration_s=args.duration_s, seed=args.seed,
                        spike_factor=args.spike_factor)
    t0 = time.perf_counter()
    results = compare(trace, cal, fleet, _specs(args.policies, fleet, cal))
    wall = time.perf_counter() - t0
    if args.plot:
        plot(results, trace, args.plot, f"{trace.name} trace, {args.gpus} GPUs, TTFT SLO {args.ttft_slo_s:g} s, "
                                       f"cold start {cal.replica_cold_start_s:g} s")
    return {"trace": trace.name, "gpus": args.gpus, "duration_s": trace.duration_s,
            "base_rps": round(base, 3), "ttft_slo_s": args.ttft_slo_s,
            "calibration": asdict(cal), "sim_wall_s": round(wall, 3),
            "policies": {n: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.metrics.items()}
                         for n, r in results.items()},
            **({"plot": str(args.plot)} if args.plot else {})}


def format_table(out: dict[str, Any]) -> str:
    cols = ("slo_attainment", "shed_ratio", "ttft_p50_s", "ttft_p99_s", "gpu_hours", "peak_replicas",
            "seconds_to_first_upscale")
    lines = [f"trace {out['trace']}, {out['gpus']} GPUs, {out['duration_s']:.0f} s, base {out['base_rps']:.1f} req/s, "
             f"TTFT SLO {out['ttft_slo_s']:g} s, replica cold start {out['calibration']['replica_cold_start_s']:g} s",
             f"{'policy':<12}" + "".join(f"{c:>26}" for c in cols)]
    for name, m in out["policies"].items():
        lines.append(f"{name:<12}" + "".join(f"{m[c]:>26.4f}" for c in cols))
    return "\n".join(lines)


def run_simulate(args: argparse.Namespace) -> int:
    out = run_simulation(args)
    print(json.dumps(out) if args.json else format_table(out))
    return 0


def main(argv: list[str] | None = None) -> int:     # python -m serving.autoscaling.simulator ...
    p = argparse.ArgumentParser(prog="simulate")
    add_simulate_arguments(p)
    return run_simulate(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
