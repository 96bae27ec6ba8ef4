"""When requests arrive: arrival processes and rate profiles (pure functions, seeded).

Three arrival modes for `moe-serve bench`:
  concurrency  closed loop: C requests always in flight (no schedule; the driver refills)
  poisson      open loop: exponential gaps at `rate` req/s
  gamma        open loop: gamma gaps with mean 1/rate and shape `burstiness`
               (1 = Poisson, < 1 burstier, > 1 smoother; as vLLM's benchmark)

Rate profiles for `moe-serve loadtest` are `Profile`s: a rate(t) in req/s over
[0, duration_s), sampled into arrival times by thinning a Poisson process.

  spike    base, then `multiplier` x base over [spike_start_s, spike_end_s), then base
  ramp     base rising linearly to `multiplier` x base at the end
  diurnal  one sine "day": base at t=0 and the end, `multiplier` x base at mid-run
  poisson  constant base
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

RateFn = Callable[[float], float]
PROFILES = ("spike", "ramp", "diurnal", "poisson")
MODES = ("concurrency", "poisson", "gamma")


def poisson_arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n arrival times (s, from 0) of a Poisson process with `rate` req/s."""
    return gamma_arrivals(rate, 1.0, n, rng)


def gamma_arrivals(rate: float, burstiness: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n arrival times with gamma(shape=burstiness, mean 1/rate) gaps; the first at 0."""
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive finite number, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if n <= 0:
        return np.zeros(0)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def thinned_arrivals(rate_fn: RateFn, duration_s: float, rate_max: float,
                     rng: np.random.Generator, max_count: int | None = None) -> np.ndarray:
    """Arrival times of a non-homogeneous Poisson process with rate_fn(t) <= rate_max,
    over [0, duration_s), by thinning (Lewis-Shedler). At most `max_count` arrivals."""
    if rate_max <= 0:
        return np.zeros(0)
    out: list[float] = []
    t = 0.0
    while True:
        # draw candidates in chunks: fast even at thousands of arrivals
        gaps = rng.exponential(1.0 / rate_max, size=256)
        keep = rng.random(256)
        for gap, u in zip(gaps, keep):
            t += float(gap)
            if t >= duration_s or (max_count is not None and len(out) >= max_count):
                return np.asarray(out)
            if u * rate_max <= rate_fn(t):
                out.append(t)


@dataclass(frozen=True, kw_only=True, slots=True)
class Profile:
    """A rate profile over [0, duration_s). The spike window (stress window for the
    others) is where the summary's "during the spike" numbers are taken."""
    name: str
    duration_s: float
    base_rate: float
    multiplier: float
    spike_start_s: float
    spike_end_s: float

    def rate(self, t: float) -> float:
        b, m, d = self.base_rate, self.multiplier, self.duration_s
        if t < 0 or t >= d:
            return 0.0
        if self.name == "spike":
            return b * m if self.spike_start_s <= t < self.spike_end_s else b
        if self.name == "ramp":
            return b + (m - 1.0) * b * t / d
        if self.name == "diurnal":
            return b + (m - 1.0) * b * 0.5 * (1.0 - math.cos(2.0 * math.pi * t / d))
        return b   # poisson

    @property
    def peak_rate(self) -> float:
        return self.base_rate * (1.0 if self.name == "poisson" else max(1.0, self.multiplier))

    def phase(self, t: float) -> str:
        if self.name == "spike":
            return ("baseline" if t < self.spike_start_s else
                    "spike" if t < self.spike_end_s else "recovery")
        return self.name

    def expected_count(self, step_s: float = 0.05) -> float:
        """The integral of rate(t) over the run (expected number of arrivals)."""
        n = max(1, int(self.duration_s / step_s))
        return sum(self.rate((i + 0.5) * self.duration_s / n) for i in range(n)) * self.duration_s / n

    def arrivals(self, rng: np.random.Generator, max_count: int | None = None) -> np.ndarray:
        return thinned_arrivals(self.rate, self.duration_s, self.peak_rate, rng, max_count)


def make_profile(name: str, duration_s: float, base_rate: float, multiplier: float = 10.0,
                 spike_start_frac: float = 0.25, spike_len_frac: float = 0.4) -> Profile:
    """A named profile. spike: baseline for `spike_start_frac` of the run, `multiplier`x
    for `spike_len_frac`, then baseline again. For ramp and diurnal the stress window is
    where the rate is above half its peak; for poisson, the whole run."""
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {name!r}")
    if duration_s <= 0 or base_rate <= 0:
        raise ValueError("duration_s and base_rate must be > 0")
    if not (0 <= spike_start_frac < 1 and 0 < spike_len_frac <= 1 - spike_start_frac):
        raise ValueError("need 0 <= spike_start_frac < 1 and 0 < spike_len_frac <= 1 - start")
    d = duration_s
    if name == "spike":
        a, b = spike_start_frac * d, (spike_start_frac + spike_len_frac) * d
    elif name == "ramp":   # rate above half its peak: t/d >= (m/2 - 1)/(m - 1)
        a, b = (max(0.0, (multiplier / 2 - 1) / (multiplier - 1)) * d if multiplier > 1 else 0.0), d
    elif name == "diurnal":
        a, b = d / 4, 3 * d / 4
    else:
        a, b = 0.0, d
    return Profile(name=name, duration_s=d, base_rate=base_rate, multiplier=multiplier,
                   spike_start_s=a, spike_end_s=b)
