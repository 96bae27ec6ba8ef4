"""`moe-serve loadtest`: rehearse a traffic spike against a running cluster (loopback only).

  moe-serve loadtest --target 127.0.0.1:50051 --profile spike --duration 60 --out runs/spike \
                     --metrics-url http://127.0.0.1:9464/metrics

1. Measures the sustainable rate: `--measure-concurrency` streams back to back for
   `--measure-s` seconds (skipped with `--base-rate R`). The base rate is then
   `--baseline-load` x that rate (the usual traffic sits well below capacity). With
   `--metrics-url` it then waits (at most `--settle-s`) for the engine deployment to be back
   at its replica count from before the measurement and idle, so the profile starts clean.
2. Runs the profile (serving/loadgen/arrivals.py) open loop: arrivals are Poisson with
   rate(t), each one interactive or batch (`--batch-fraction`). spike = base, then
   `--spike-multiplier` x base for `--spike-len-frac` of the run, then base again.
3. Bounded: arrivals stop at `--duration`, at most `--max-requests` are sent and at most
   `--max-in-flight` run at once (an arrival beyond that is skipped and counted as
   client_skipped); in-flight requests get `--drain-s` more seconds, then are cancelled.
4. Writes DIR/timeline.csv (one row per second), DIR/summary.json (the totals, the
   verdict and the timeline), DIR/requests.csv (one row per request) and DIR/timeline.png,
   and prints a verdict table. Replicas and queue depth come from `--metrics-url`
   (serving/loadgen/scrape.py); without it those columns are blank.

Definitions (summary.json):
  offered     requests sent (client_skipped ones are not)
  admitted    not shed at the door: got a first token, or finished OK
  shed        ended RESOURCE_EXHAUSTED without a token
  errors      any other non-OK end (errors_by_code); CANCELLED there means the drain ran out
  offered = admitted + shed + (errors of never-admitted requests);
  admitted = completed + admitted_not_completed
  "spike window": [spike_start_s, spike_end_s) for spike; for ramp/diurnal the high-rate part,
  for poisson the whole run. interactive_admit_ratio and ttft_p99_admitted_interactive_s are
  taken over requests sent in that window; *_overall are over the whole run.
  seconds_to_first_upscale_decision: first scrape at or after the window start where the
  engine deployment's desired replicas exceed its replicas at the window start (minus the
  window start); null without the desired-replicas metric or if it never rises.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serving.client import add_caller_arguments, caller_token
from serving.loadgen.arrivals import PROFILES, Profile, make_profile
from serving.loadgen.driver import RequestResult, ensure_loopback
from serving.loadgen.scrape import ClusterSnapshot, engine_deployment, scrape
from serving.loadgen.stats import command_line, machine_info, percentile

BAD_CODES = ("INTERNAL", "UNKNOWN", "UNAVAILABLE")


def add_loadtest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="HOST:PORT of the gRPC endpoint (loopback only)")
    parser.add_argument("--profile", choices=PROFILES, default="spike")
    parser.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    parser.add_argument("--out", type=Path, required=True, help="directory for the artifacts")
    parser.add_argument("--metrics-url", default=None,
                        help="Prometheus endpoint, e.g. http://127.0.0.1:9464/metrics")
    parser.add_argument("--base-rate", default="measure",
                        help="baseline req/s, or 'measure' (default): --baseline-load x the "
                             "measured sustainable rate")
    parser.add_argument("--baseline-load", type=float, default=0.2,
                        help="base rate as a fraction of the measured sustainable rate")
    parser.add_argument("--measure-s", type=float, default=8.0, help="seconds of rate measurement")
    parser.add_argument("--measure-concurrency", type=int, default=12,
                        help="closed-loop streams while measuring: the engine autoscaler's target "
                             "load per replica (target_ongoing_per_replica, 12 in cluster/"
                             "serve_config.yaml): the rate one replica serves at the load it is "
                             "scaled to hold, not at a full batch it would not be left with")
    parser.add_argument("--settle-s", type=float, default=30.0,
                        help="after measuring, wait up to this long (with --metrics-url) for the "
                             "engine to be back at its replica count from before, idle")
    parser.add_argument("--spike-multiplier", type=float, default=10.0,
                        help="peak rate / base rate (spike, ramp, diurnal)")
    parser.add_argument("--spike-start-frac", type=float, default=0.25)
    parser.add_argument("--spike-len-frac", type=float, default=0.4)
    parser.add_argument("--batch-fraction", type=float, default=0.5,
                        help="share of arrivals with batch priority")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--system-prompt-len", type=int, default=0,
                        help="every request starts with the same this many seeded ids (a chat app's "
                             "system prompt; the engine's prefix cache computes it once), then --prompt-len of its own")
    parser.add_argument("--vocab-size", type=int, default=256,
                        help="prompt ids are drawn from [3, VOCAB_SIZE)")
    parser.add_argument("--ttft-slo-s", type=float, default=1.0,
                        help="TTFT SLO of interactive requests (the verdict allows 2x)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-requests", type=int, default=20000, help="cap on requests sent")
    parser.add_argument("--max-in-flight", type=int, default=512)
    parser.add_argument("--drain-s", type=float, default=30.0,
                        help="seconds after --duration for in-flight requests to finish")
    parser.add_argument("--tail-s", type=float, default=0.0,
                        help="keep scraping metrics this long after the last request (downscale)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-request gRPC deadline")
    parser.add_argument("--scrape-interval-s", type=float, default=0.5)
    parser.add_argument("--application", default=None, help="Ray Serve application name")
    add_caller_arguments(parser)
    parser.add_argument("--strict", action="store_true", help="exit 1 if a verdict check fails")
    parser.add_argument("--json", action="store_true", help="print summary.json instead of tables")


@dataclass(slots=True)
class Scrape:
    t_s: float
    snap: ClusterSnapshot


# ---- running ---------------------------------------------------------------------------

def _request_factory(args: argparse.Namespace, rng: np.random.Generator, priorities: Sequence[str]):
    from serving.client import build_request

    system = np.random.default_rng([args.seed, 1]).integers(
        3, args.vocab_size, size=args.system_prompt_len).tolist()

    def make(i: int) -> tuple[Any, str]:
        prio = priorities[i] if i < len(priorities) else "interactive"
        ids = system + rng.integers(3, args.vocab_size, size=args.prompt_len).tolist()
        return build_request(prompt_ids=ids, max_tokens=args.max_tokens, temperature=0.0,
                             ignore_eos=True, priority=prio, request_id=f"lt-{i}-{prio}"), prio
    return make


def engine_replicas(snap: ClusterSnapshot | None) -> tuple[str | None, float | None]:
    """The engine's deployment in a snapshot and its replica count (None, None if unknown)."""
    eng = engine_deployment({*snap.replicas, *snap.desired}) if snap is not None else None
    return eng, (snap.replicas.get(eng) if eng else None)


def done_by(results: Sequence[RequestResult], t_s: float) -> int:
    """OK requests finished within `t_s` seconds of the run's start."""
    return sum(r.ok and r.e2e_s is not None and r.start_s + r.e2e_s <= t_s for r in results)


def rate_from_tokens(results: Sequence[RequestResult], tokens_per_request: int, wall_s: float,
                     cut_s: float | None = None) -> float:
    """Requests per second a closed loop sustained, from its token throughput: the tokens that
    arrived in the last three quarters of the run (up to `cut_s`, if given), per second, over the
    tokens each request generates. Counting finished requests instead is quantized: the streams
    start together and finish in waves, so an 8 s window of 24 streams held 16, 24 or 32
    completions (2, 3 or 4 req/s) for the same engine, and it never counts the work in flight."""
    end = wall_s if cut_s is None else min(cut_s, wall_s)
    begin = end / 4                                   # the first wave's prefill and ramp-up
    tokens = sum(begin <= t < end for r in results for t in r.token_times())
    return tokens / max(end - begin, 1e-9) / tokens_per_request


async def measure_rate(args: argparse.Namespace, before: ClusterSnapshot | None = None
                       ) -> tuple[float, dict[str, Any]]:
    """Sustainable req/s of the replicas serving when it starts: closed loop at --measure-concurrency
    for --measure-s (interactive), from the token throughput (`rate_from_tokens`).

    The closed loop overloads the engine on purpose, so the autoscaler may bring a replica up
    before it ends; counting that replica's work would make the spike (a multiple of this rate)
    bigger than the profile means. So the metrics are watched, and the rate is taken over the
    time until the engine's replica count first rises (`measure_cut_s`; it needs one full round of
    --measure-concurrency requests done by then), or over the whole run."""
    from serving.loadgen.driver import GrpcDriver
    rng = np.random.default_rng(args.seed + 99)
    make = _request_factory(args, rng, [])
    eng, start = engine_replicas(before)
    cut: list[float] = []
    every_s = min(1.0, max(0.1, args.measure_s / 8))    # a few looks even in a short measurement

    async def watch(t0: float) -> None:
        if start is None or not args.metrics_url:
            return
        while not cut:
            snap = await asyncio.to_thread(scrape, args.metrics_url, 1.0)
            if snap.replicas.get(eng, 0.0) > start:
                cut.append(time.perf_counter() - t0)
            await asyncio.sleep(every_s)

    async with GrpcDriver(args.target, timeout_s=args.timeout_s, application=args.application,
                          tenant=args.tenant, token=caller_token(args),
                          max_in_flight=args.measure_concurrency) as drv:
        await drv.wait_ready(timeout_s=30.0)
        await drv.closed_loop(make, concurrency=1, num_requests=1, max_duration_s=args.timeout_s)
        watcher = asyncio.ensure_future(watch(time.perf_counter()))
        try:
            results, wall = await drv.closed_loop(
                make, concurrency=args.measure_concurrency, num_requests=args.max_requests,
                max_duration_s=args.measure_s)
        finally:
            watcher.cancel()
    rose_s = cut[0] if cut and cut[0] < wall else None
    # the cut needs a full round of the closed loop before it, or the rate is mostly start-up
    cut_s = rose_s if rose_s is not None and done_by(results, rose_s) >= args.measure_concurrency else None
    return rate_from_tokens(results, args.max_tokens, wall, cut_s), {
        "measure_wall_s": wall, "measure_engine_replicas": start,
        "measure_replicas_rose_s": rose_s, "measure_cut_s": cut_s}


async def settle_after_measuring(args: argparse.Namespace, before: ClusterSnapshot, log) -> dict:
    """Measuring loads the cluster and may scale it up: wait (bounded by --settle-s) until the
    engine is back to its replica count from before and idle, so the profile starts clean."""
    eng, start = engine_replicas(before)
    if not args.metrics_url or args.settle_s <= 0 or start is None:
        return {"settle_wait_s": 0.0, "settled": None}
    print(f"waiting up to {args.settle_s:g} s for {eng} to settle back to {start:g} replica(s) ...",
          file=log, flush=True)
    t0 = time.perf_counter()
    while True:
        snap = await asyncio.to_thread(scrape, args.metrics_url)
        calm = (snap.replicas.get(eng, math.inf) <= start and snap.desired.get(eng, start) <= start
                and not snap.queue_depth and not snap.running)
        waited = time.perf_counter() - t0
        if calm or waited >= args.settle_s:
            return {"settle_wait_s": waited, "settled": calm}
        await asyncio.sleep(1.0)


async def run_profile(args: argparse.Namespace, profile: Profile
                      ) -> tuple[list[RequestResult], list[float], list[Scrape], float]:
    """(results, client-skipped arrival times, scrapes, seconds until the last scrape)."""
    from serving.loadgen.driver import GrpcDriver
    rng = np.random.default_rng(args.seed)
    times = profile.arrivals(rng, max_count=args.max_requests)
    priorities = np.where(rng.random(len(times)) < args.batch_fraction, "batch", "interactive").tolist()
    make = _request_factory(args, np.random.default_rng(args.seed + 1), priorities)
    skipped: list[float] = []
    scrapes: list[Scrape] = []
    stop = asyncio.Event()

    async def sampler(t0: float) -> None:
        while True:
            t = time.perf_counter() - t0
            snap = await asyncio.to_thread(scrape, args.metrics_url, min(1.0, args.scrape_interval_s * 2))
            scrapes.append(Scrape(t, snap))
            try:
                await asyncio.wait_for(stop.wait(), max(0.05, args.scrape_interval_s))
                return
            except asyncio.TimeoutError:
                pass

    async with GrpcDriver(args.target, timeout_s=args.timeout_s, application=args.application,
                          tenant=args.tenant, token=caller_token(args),
                          max_in_flight=args.max_in_flight) as drv:
        await drv.wait_ready(timeout_s=30.0)
        t0 = time.perf_counter()
        sampling = asyncio.ensure_future(sampler(t0)) if args.metrics_url else None
        results, _ = await drv.open_loop(make, times, max_duration_s=profile.duration_s + args.drain_s,
                                         on_skip=lambda i, t: skipped.append(t), t0=t0)
        if sampling is not None:
            if args.tail_s > 0:
                await asyncio.sleep(args.tail_s)
            stop.set()
            await sampling
        end = time.perf_counter() - t0
    return results, skipped, scrapes, end


# ---- analysis ---------------------------------------------------------------------------

def _sec(t: float | None) -> int | None:
    return None if t is None else int(math.floor(max(0.0, t)))


def build_timeline(results: Sequence[RequestResult], skipped: Sequence[float],
                   scrapes: Sequence[Scrape], profile: Profile, end_s: float) -> list[dict[str, Any]]:
    """One row per second of the run (see the module docstring for the columns)."""
    n = max(1, int(math.ceil(max(end_s, profile.duration_s,
                                 max((r.end_s or 0.0 for r in results), default=0.0)))))
    rows: list[dict[str, Any]] = [defaultdict(int) for _ in range(n)]
    ttfts: list[list[float]] = [[] for _ in range(n)]
    ttfts_inter: list[list[float]] = [[] for _ in range(n)]
    codes = sorted({r.code for r in results if not r.ok and not r.shed})

    def at(t: float | None) -> dict | None:
        s = _sec(t)
        return rows[min(s, n - 1)] if s is not None else None

    for t in skipped:
        at(t)["client_skipped"] += 1
    for r in results:
        row = at(r.start_s)
        row["offered"] += 1
        row[f"offered_{r.priority}"] += 1
        if r.admitted:
            row["admitted"] += 1
            row[f"admitted_{r.priority}"] += 1
        end = at(r.end_s)
        if end is not None:
            if r.ok:
                end["completed"] += 1
            elif r.shed:
                end["shed"] += 1
                end[f"shed_{r.priority}"] += 1
            else:
                end["errors"] += 1
                end[f"errors_{r.code}"] += 1
        if r.first_token_s is not None:
            ttfts[min(_sec(r.first_token_s), n - 1)].append(r.ttft_s)
            if r.priority == "interactive":
                ttfts_inter[min(_sec(r.first_token_s), n - 1)].append(r.ttft_s)
        for tt in r.token_times():
            at(tt)["tokens_per_s"] += 1
    ends = sorted(r.end_s for r in results if r.end_s is not None)
    starts = sorted(r.start_s for r in results)
    deployments = sorted({d for s in scrapes for d in (*s.snap.replicas, *s.snap.desired)})
    by_sec: dict[int, ClusterSnapshot] = {}
    for s in scrapes:      # the last scrape within each second
        by_sec[min(_sec(s.t_s), n - 1)] = s.snap
    out = []
    for s in range(n):
        row = rows[s]
        snap = by_sec.get(s)
        rec: dict[str, Any] = {
            "t_s": s, "phase": profile.phase(s + 0.5), "target_rate": round(profile.rate(s + 0.5), 3)}
        for key in ("offered", "offered_interactive", "offered_batch", "client_skipped",
                    "admitted", "admitted_interactive", "admitted_batch", "completed",
                    "shed", "shed_interactive", "shed_batch", "errors"):
            rec[key] = row.get(key, 0)
        for code in codes:
            rec[f"errors_{code}"] = row.get(f"errors_{code}", 0)
        rec["in_flight"] = (int(np.searchsorted(starts, s + 1)) - int(np.searchsorted(ends, s + 1)))
        rec["ttft_p50_s"] = percentile(ttfts[s], 50)
        rec["ttft_p99_s"] = percentile(ttfts[s], 99)
        rec["ttft_p99_interactive_s"] = percentile(ttfts_inter[s], 99)
        rec["tokens_per_s"] = row.get("tokens_per_s", 0)
        rec["queue_depth"] = snap.queue_depth if snap else None
        rec["running"] = snap.running if snap else None
        for d in deployments:
            rec[f"replicas_{d}"] = snap.replicas.get(d) if snap else None
        for d in deployments:
            rec[f"desired_{d}"] = snap.desired.get(d) if snap else None
        out.append(rec)
    return out


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def summarize_run(results: Sequence[RequestResult], skipped: Sequence[float],
                  scrapes: Sequence[Scrape], profile: Profile, end_s: float,
                  ttft_slo_s: float) -> dict[str, Any]:
    a, b = profile.spike_start_s, profile.spike_end_s
    codes = Counter(r.code for r in results)
    admitted = [r for r in results if r.admitted]
    shed = [r for r in results if r.shed]
    errors = [r for r in results if not r.ok and not r.shed]
    inter = [r for r in results if r.priority == "interactive"]
    inter_win = [r for r in inter if a <= r.start_s < b]
    batch_win = [r for r in results if r.priority == "batch" and a <= r.start_s < b]
    win_ttft = [r.ttft_s for r in inter_win if r.admitted and r.ttft_s is not None]
    all_ttft = [r.ttft_s for r in inter if r.admitted and r.ttft_s is not None]
    tokens = sum(r.tokens for r in results)

    s: dict[str, Any] = {
        "profile": profile.name, "duration_s": profile.duration_s, "base_rate": profile.base_rate,
        "peak_rate": profile.peak_rate, "spike_multiplier": profile.multiplier,
        "spike_window_s": [a, b], "ttft_slo_s": ttft_slo_s, "run_seconds": end_s,
        "offered": len(results),
        "offered_interactive": len(inter),
        "offered_batch": len(results) - len(inter),
        "client_skipped": len(skipped),
        "admitted": len(admitted),
        "completed": codes.get("OK", 0),
        "shed": len(shed),
        "shed_interactive": sum(r.priority == "interactive" for r in shed),
        "shed_batch": sum(r.priority == "batch" for r in shed),
        "shed_with_pushback": sum(r.pushback_ms is not None and r.pushback_ms > 0 for r in shed),
        "shed_pushback_sources": dict(sorted(Counter(r.pushback_source or "none" for r in shed).items())),
        "pushback_ms_p50": percentile([r.pushback_ms for r in shed if r.pushback_ms is not None], 50),
        "errors": len(errors),
        "errors_by_code": dict(sorted(Counter(r.code for r in errors).items())),
        "codes": dict(sorted(codes.items())),
        "admitted_not_completed": sum(not r.ok for r in admitted),
        "failed_after_first_token": sum(r.ttft_s is not None and not r.ok for r in results),
        "interactive_admit_ratio": _ratio(sum(r.admitted for r in inter_win), len(inter_win)),
        "interactive_admit_ratio_overall": _ratio(sum(r.admitted for r in inter), len(inter)),
        "batch_admit_ratio": _ratio(sum(r.admitted for r in batch_win), len(batch_win)),
        "ttft_p50_admitted_interactive_s": percentile(win_ttft, 50),
        "ttft_p99_admitted_interactive_s": percentile(win_ttft, 99),
        "ttft_p99_admitted_interactive_overall_s": percentile(all_ttft, 99),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / max(end_s, 1e-9),
    }
    s.update(_scaling(scrapes, a))
    return s


def _scaling(scrapes: Sequence[Scrape], window_start: float) -> dict[str, Any]:
    names = {d for sc in scrapes for d in (*sc.snap.replicas, *sc.snap.desired)}
    eng = engine_deployment(names)
    out: dict[str, Any] = {"engine_deployment": eng, "replicas_at_spike_start": None,
                           "seconds_to_first_upscale_decision": None,
                           "seconds_to_first_upscale": None, "max_engine_replicas": None,
                           "final_engine_replicas": None, "min_engine_replicas": None,
                           "max_replicas_by_deployment": {}, "final_replicas_by_deployment": {},
                           "queue_depth_max": None}
    qd = [sc.snap.queue_depth for sc in scrapes if sc.snap.queue_depth is not None]
    out["queue_depth_max"] = max(qd) if qd else None
    for d in sorted(names):
        vals = [sc.snap.replicas[d] for sc in scrapes if d in sc.snap.replicas]
        if vals:
            out["max_replicas_by_deployment"][d] = max(vals)
            out["final_replicas_by_deployment"][d] = vals[-1]
    out.update(_shard_scaling(scrapes, window_start, names))
    if eng is None:
        return out
    reps, desired = _series(scrapes, "replicas", eng), _series(scrapes, "desired", eng)
    base = _at_start(reps, window_start) if reps else _at_start(desired, window_start)
    out["replicas_at_spike_start"] = base
    if reps:
        out["max_engine_replicas"] = max(v for _, v in reps)
        out["min_engine_replicas"] = min(v for _, v in reps)
        out["final_engine_replicas"] = reps[-1][1]
        out["seconds_to_first_upscale"] = _seconds_to_rise(reps, base, window_start)
    if desired and base is not None:
        out["seconds_to_first_upscale_decision"] = _seconds_to_rise(desired, base, window_start)
    return out


def _series(scrapes: Sequence[Scrape], kind: str, deployment: str) -> list[tuple[float, float]]:
    """(t_s, value) of one deployment's `replicas` or `desired` replicas, over the scrapes."""
    return [(sc.t_s, getattr(sc.snap, kind)[deployment]) for sc in scrapes if deployment in getattr(sc.snap, kind)]


def _at_start(series: list[tuple[float, float]], window_start: float) -> float | None:
    """The last value at or before the window start (the first one if none is that early)."""
    before = [v for t, v in series if t <= window_start]
    return before[-1] if before else (series[0][1] if series else None)


def _seconds_to_rise(series: list[tuple[float, float]], base: float | None, window_start: float) -> float | None:
    """Seconds from the window start to the first value above `base` (None if it never rises)."""
    ups = [t for t, v in series if t >= window_start and base is not None and v > base]
    return ups[0] - window_start if ups else None


def _first_upscale_decision(scrapes: Sequence[Scrape], deployment: str, window_start: float) -> float | None:
    """When the deployment's desired replicas first exceed their value at the window start."""
    desired = _series(scrapes, "desired", deployment)
    return _seconds_to_rise(desired, _at_start(desired, window_start), window_start)


def _shard_scaling(scrapes: Sequence[Scrape], window_start: float, names: set[str]) -> dict[str, Any]:
    """Which expert shard took the most routed tokens during the run, and when each shard
    deployment (ExpertShard<i>) first decided to scale up."""
    shards = {int(d.removeprefix("ExpertShard")): d for d in names
              if d.startswith("ExpertShard") and d.removeprefix("ExpertShard").isdigit()}
    routed = [sc.snap.routed_by_shard for sc in scrapes if sc.snap.routed_by_shard]
    by_shard = ({s: routed[-1].get(s, 0.0) - routed[0].get(s, 0.0) for s in routed[-1]} if routed else {})
    hot = max(by_shard, key=by_shard.get) if by_shard else None
    return {"routed_tokens_by_shard": {str(k): v for k, v in sorted(by_shard.items())},
            "hottest_shard_deployment": shards.get(hot) if hot is not None else None,
            "first_upscale_decision_s_by_deployment": {
                d: _first_upscale_decision(scrapes, d, window_start) for d in sorted(shards.values())}}


def hottest_shard_scaled_first(s: dict[str, Any]) -> bool | None:
    """The shard that took the most tokens decided to scale no later than any other (None: no data)."""
    hot, first = s.get("hottest_shard_deployment"), s.get("first_upscale_decision_s_by_deployment") or {}
    if hot is None or not first:
        return None
    t_hot = first.get(hot)
    return t_hot is not None and all(t is None or t_hot <= t for t in first.values())


def verdict(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The spike-survival checks of issue 5: PASS, FAIL or N/A (no data)."""
    def row(name: str, value: Any, target: str, ok: bool | None) -> dict[str, Any]:
        return {"check": name, "value": value, "target": target,
                "result": "N/A" if ok is None else "PASS" if ok else "FAIL"}

    bad = sum(s["errors_by_code"].get(c, 0) for c in BAD_CODES)
    iar, ttft = s["interactive_admit_ratio"], s["ttft_p99_admitted_interactive_s"]
    up, serving = s["seconds_to_first_upscale_decision"], s["seconds_to_first_upscale"]
    final, start = s["final_engine_replicas"], s["replicas_at_spike_start"]
    return [
        row("no INTERNAL/UNKNOWN/UNAVAILABLE", bad, "0", bad == 0),
        row("every shed request has pushback", f"{s['shed_with_pushback']}/{s['shed']}",
            "all", s["shed_with_pushback"] == s["shed"]),
        row("admitted requests all complete", s["admitted_not_completed"], "0 not completed",
            s["admitted_not_completed"] == 0),
        row("interactive admitted (spike window)", None if iar is None else round(iar, 4), ">= 0.9",
            None if iar is None else iar >= 0.9),
        row("p99 TTFT admitted interactive (spike)", None if ttft is None else round(ttft, 3),
            f"<= {2 * s['ttft_slo_s']:g} s", None if ttft is None else ttft <= 2 * s["ttft_slo_s"]),
        row("engine upscale decision after spike start",
            None if up is None else round(up, 2), "<= 5 s",
            None if s["replicas_at_spike_start"] is None else (up is not None and up <= 5.0)),
        row("new engine replica serving after spike start",
            None if serving is None else round(serving, 2), "<= 15 s",
            None if s["replicas_at_spike_start"] is None else (serving is not None and serving <= 15.0)),
        row("engine replicas back to the start count", final, f"<= {start}",
            None if final is None or start is None else final <= start),
        row("hottest expert shard scales first", s.get("hottest_shard_deployment"),
            "first upscale decision", hottest_shard_scaled_first(s)),
    ]


# ---- artifacts --------------------------------------------------------------------------

def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def render_png(path: Path, timeline: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in timeline]
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    a, b = summary["spike_window_s"]
    for ax in axes:
        if summary["profile"] != "poisson":
            ax.axvspan(a, b, color="orange", alpha=0.08, lw=0)
        ax.grid(alpha=0.3)

    ax = axes[0]
    ax.step(t, [r["target_rate"] for r in timeline], "k--", where="post", lw=1, label="target rate")
    for key, style in (("offered", "-"), ("admitted", "-"), ("completed", "-"), ("shed", "-")):
        ax.plot(t, [r[key] for r in timeline], style, label=key)
    if any(r["errors"] for r in timeline):
        ax.plot(t, [r["errors"] for r in timeline], "r-", label="errors")
    ax.set_ylabel("requests / s")
    ax.set_title(f"moe-serve loadtest --profile {summary['profile']}: base {summary['base_rate']:.2f} req/s, "
                 f"x{summary['spike_multiplier']:g}")
    ax.legend(loc="upper right", fontsize=8, ncol=3)

    ax = axes[1]
    ax.plot(t, [r["ttft_p50_s"] for r in timeline], label="TTFT p50")
    ax.plot(t, [r["ttft_p99_s"] for r in timeline], label="TTFT p99 (all; batch waits by design)")
    ax.plot(t, [r["ttft_p99_interactive_s"] for r in timeline], label="TTFT p99 interactive")
    ax.axhline(summary["ttft_slo_s"], color="g", ls=":", label="SLO")
    ax.axhline(2 * summary["ttft_slo_s"], color="r", ls=":", label="2x SLO")
    ax.set_ylabel("seconds")
    ax.legend(loc="upper right", fontsize=8, ncol=2)

    ax = axes[2]
    drew = False
    for k in sorted(timeline[0]) if timeline else []:
        if k.startswith(("replicas_", "desired_")):
            vals = [r[k] for r in timeline]
            if any(v is not None for v in vals):
                ax.step(t, [math.nan if v is None else v for v in vals], where="post",
                        ls="-" if k.startswith("replicas_") else "--", label=k)
                drew = True
    ax.set_ylabel("replicas")
    ax2 = None
    for key, color in (("queue_depth", "gray"), ("running", "purple")):
        vals = [r[key] for r in timeline]
        if any(v is not None for v in vals):
            ax2 = ax2 or ax.twinx()
            ax2.plot(t, [math.nan if v is None else v for v in vals], color=color, alpha=0.6,
                     lw=1, label=key.replace("_", " "))
    if ax2 is not None:
        ax2.set_ylabel("requests (engine)")
        ax2.legend(loc="upper left", fontsize=8)
    if drew:
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no replica metrics (--metrics-url)", ha="center", va="center",
                transform=ax.transAxes, color="gray")

    ax = axes[3]
    ax.plot(t, [r["tokens_per_s"] for r in timeline], label="output tokens/s")
    ax.plot(t, [r["in_flight"] for r in timeline], label="in flight")
    ax.set_xlabel("seconds since start")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def format_verdict(s: dict[str, Any], checks: Sequence[dict[str, Any]]) -> str:
    lines = [f"offered {s['offered']}  admitted {s['admitted']}  completed {s['completed']}  "
             f"shed {s['shed']} (interactive {s['shed_interactive']}, batch {s['shed_batch']})  "
             f"errors {s['errors_by_code'] or 0}  client-skipped {s['client_skipped']}",
             f"{'check':<44}{'value':>14}  {'target':<18}result"]
    for c in checks:
        v = "-" if c["value"] is None else str(c["value"])
        lines.append(f"{c['check']:<44}{v:>14}  {c['target']:<18}{c['result']}")
    return "\n".join(lines)


# ---- entry ------------------------------------------------------------------------------

def _check(args: argparse.Namespace) -> float | None:
    ensure_loopback(args.target)
    if args.metrics_url:
        from urllib.parse import urlparse
        host = urlparse(args.metrics_url).hostname or ""
        ensure_loopback(f"{host}:0")
    if args.duration <= 0:
        raise ValueError("--duration must be > 0")
    if not 0 <= args.batch_fraction <= 1:
        raise ValueError("--batch-fraction must be in [0, 1]")
    if args.max_tokens < 1 or args.prompt_len < 1 or args.max_requests < 1 or args.max_in_flight < 1:
        raise ValueError("--max-tokens, --prompt-len, --max-requests, --max-in-flight must be >= 1")
    if args.system_prompt_len < 0:
        raise ValueError("--system-prompt-len must be >= 0")
    if str(args.base_rate).lower() == "measure":
        return None
    try:
        rate = float(args.base_rate)
    except ValueError:
        raise ValueError(f"--base-rate must be a number or 'measure', got {args.base_rate!r}") from None
    if not rate > 0:
        raise ValueError("--base-rate must be > 0")
    return rate


def run_loadtest(args: argparse.Namespace) -> int:
    """`moe-serve loadtest`: 0 once the artifacts are written (1 with --strict and a failed
    check, or if nothing could be measured), 2 on bad arguments."""
    try:
        base = _check(args)
        profile_check = make_profile(args.profile, args.duration, base or 1.0, args.spike_multiplier,
                                     args.spike_start_frac, args.spike_len_frac)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    del profile_check
    log = sys.stderr if args.json else sys.stdout

    settle: dict[str, Any] = {}

    async def measure_then_run() -> tuple[float | None, Profile, tuple]:
        # one event loop for both phases: grpc.aio does not like a loop per phase
        rate, measured = base, None
        if rate is None:
            before = await asyncio.to_thread(scrape, args.metrics_url)
            print(f"measuring the sustainable rate ({args.measure_concurrency} streams, "
                  f"{args.measure_s:g} s) ...", file=log, flush=True)
            measured, info = await measure_rate(args, before)
            settle.update(info)
            if measured <= 0:
                return None, None, ()
            rate = measured * args.baseline_load
            cut = (f", over the first {info['measure_cut_s']:.1f} s: then a replica was added"
                   if info["measure_cut_s"] is not None else "")
            print(f"sustainable ~{measured:.2f} req/s{cut} -> base rate {rate:.2f} req/s",
                  file=log, flush=True)
            settle.update(await settle_after_measuring(args, before, log))
        profile = make_profile(args.profile, args.duration, rate, args.spike_multiplier,
                               args.spike_start_frac, args.spike_len_frac)
        print(f"running --profile {profile.name} for {profile.duration_s:g} s "
              f"(~{profile.expected_count():.0f} requests) ...", file=log, flush=True)
        return measured, profile, await run_profile(args, profile)

    measured, profile, ran = asyncio.run(measure_then_run())
    if profile is None:
        print("error: no request completed while measuring the sustainable rate", file=sys.stderr)
        return 1
    results, skipped, scrapes, end_s = ran

    timeline = build_timeline(results, skipped, scrapes, profile, end_s)
    summary = summarize_run(results, skipped, scrapes, profile, end_s, args.ttft_slo_s)
    checks = verdict(summary)
    summary.update(settle)
    summary.update(measured_rate=measured, baseline_load=args.baseline_load if measured else None,
                   batch_fraction=args.batch_fraction, max_tokens=args.max_tokens,
                   prompt_len=args.prompt_len, system_prompt_len=args.system_prompt_len,
                   target=args.target, metrics_url=args.metrics_url,
                   command=command_line(), machine=machine_info(), verdict=checks,
                   timeline=timeline)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "timeline.csv", timeline)
    write_csv(out / "requests.csv", [r.to_dict() for r in results])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    render_png(out / "timeline.png", timeline, summary)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_verdict(summary, checks))
        print(f"artifacts: {out / 'timeline.csv'}, {out / 'timeline.png'}, {out / 'summary.json'}")
    failed = any(c["result"] == "FAIL" for c in checks)
    return 1 if args.strict and failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-serve loadtest", description=__doc__.split("\n\n")[0])
    add_loadtest_arguments(parser)
    return run_loadtest(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
