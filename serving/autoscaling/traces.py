"""Arrival traces for the fleet simulator: request arrivals per tick (spike, diurnal, poisson, CSV).

A Trace is the number of requests arriving in each tick of `dt_s` seconds (floats: the fluid
shapes arrive as expected counts; poisson and CSV traces hold whole requests), plus the share
of them that is batch priority.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    dt_s: float
    arrivals: np.ndarray            # [ticks] requests arriving in each tick
    batch_share: float = 0.0        # fraction of arrivals that are batch priority (informational)
    events: tuple[tuple[str, float], ...] = ()   # (label, t): e.g. spike start/end, for plots

    @property
    def duration_s(self) -> float:
        return len(self.arrivals) * self.dt_s

    @property
    def total(self) -> float:
        return float(self.arrivals.sum())

    def rate(self) -> np.ndarray:
        return self.arrivals / self.dt_s


def _ticks(duration_s: float, dt_s: float) -> np.ndarray:
    return (np.arange(int(math.ceil(duration_s / dt_s))) + 0.5) * dt_s   # tick midpoints


def spike_trace(baseline_rps: float, *, dt_s: float = 0.25, warmup_s: float = 600.0, spike_s: float = 600.0,
                cooldown_s: float = 1200.0, factor: float = 10.0, ramp_s: float = 0.0) -> Trace:
    """Baseline, then `factor` x baseline for spike_s (reached over ramp_s; 0 = a step), then baseline."""
    t = _ticks(warmup_s + spike_s + cooldown_s, dt_s)
    up = np.clip((t - warmup_s) / ramp_s, 0, 1) if ramp_s > 0 else (t >= warmup_s).astype(float)
    down = (t < warmup_s + spike_s).astype(float)
    rate = baseline_rps * (1 + (factor - 1) * up * down)
    return Trace("spike", dt_s, rate * dt_s,
                 events=(("spike start", warmup_s), ("spike end", warmup_s + spike_s)))


def diurnal_trace(mean_rps: float, *, dt_s: float = 0.25, duration_s: float = 3600.0, period_s: float = 3600.0,
                  peak_to_trough: float = 4.0) -> Trace:
    """A day compressed into `period_s`: a sinusoid whose peak is peak_to_trough x its trough."""
    t = _ticks(duration_s, dt_s)
    a = (peak_to_trough - 1) / (peak_to_trough + 1)
    rate = mean_rps * (1 - a * np.cos(2 * np.pi * t / period_s))
    return Trace("diurnal", dt_s, rate * dt_s)


def poisson_trace(rps: float, *, dt_s: float = 0.25, duration_s: float = 1800.0, seed: int = 0) -> Trace:
    """Poisson arrivals at a constant `rps` (seeded, so runs repeat)."""
    rng = np.random.default_rng(seed)
    return Trace("poisson", dt_s, rng.poisson(rps * dt_s, size=len(_ticks(duration_s, dt_s))).astype(float))


def csv_trace(path: str | Path, *, dt_s: float = 0.25, time_scale: float = 1.0, rate_scale: float = 1.0) -> Trace:
    """Arrivals from a CSV with a `timestamp` column (seconds; other columns allowed, e.g. `priority`).
    A header-less file's first column is the timestamp. Times are shifted to start at 0."""
    times: list[float] = []
    batch = 0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty trace")
    header = [c.strip().lower() for c in rows[0]]
    has_header = "timestamp" in header
    ti = header.index("timestamp") if has_header else 0
    pi = header.index("priority") if has_header and "priority" in header else None
    for row in rows[1 if has_header else 0:]:
        if not row or not row[ti].strip():
            continue
        times.append(float(row[ti]) * time_scale)
        if pi is not None and len(row) > pi and row[pi].strip().lower() in ("batch", "1"):
            batch += 1
    if not times:
        raise ValueError(f"{path}: no arrivals")
    ts = np.asarray(times) - min(times)
    n = int(ts.max() // dt_s) + 1
    counts = np.bincount((ts // dt_s).astype(int), minlength=n).astype(float) * rate_scale
    return Trace(Path(path).stem, dt_s, counts, batch_share=batch / len(times))


def build_trace(spec: str, *, base_rps: float, dt_s: float = 0.25, duration_s: float | None = None,
                seed: int = 0, spike_factor: float = 10.0) -> Trace:
    """`spike` | `diurnal` | `poisson` | path/to/file.csv. base_rps = the trace's baseline/mean rate."""
    if spec == "spike":
        if duration_s is None:
            return spike_trace(base_rps, dt_s=dt_s, factor=spike_factor)
        # keep the shape: 1/4 warm-up, 1/4 spike, 1/2 after
        return spike_trace(base_rps, dt_s=dt_s, warmup_s=duration_s / 4, spike_s=duration_s / 4,
                           cooldown_s=duration_s / 2, factor=spike_factor)
    if spec == "diurnal":
        d = duration_s or 3600.0
        return diurnal_trace(base_rps, dt_s=dt_s, duration_s=d, period_s=d)
    if spec == "poisson":
        return poisson_trace(base_rps, dt_s=dt_s, duration_s=duration_s or 1800.0, seed=seed)
    if spec.endswith(".csv") or Path(spec).is_file():
        tr = csv_trace(spec, dt_s=dt_s)
        if duration_s is not None:
            tr = Trace(tr.name, dt_s, tr.arrivals[:int(duration_s / dt_s)], tr.batch_share)
        return tr
    raise ValueError(f"unknown trace {spec!r}: spike | diurnal | poisson | FILE.csv")
