"""Latency and throughput statistics of a load run, plus the run's provenance.

Definitions (the same as vLLM's benchmark_serving where they overlap):
  TTFT   request sent -> first token received (admitted requests)
  ITL    gap between consecutive tokens of one request, pooled over all requests
  TPOT   per request: (e2e - TTFT) / (tokens - 1), requests with >= 2 tokens, status OK
  e2e    request sent -> end of the stream, status OK
  output tok/s   tokens received (all requests) / wall time of the run
  req/s          OK requests / wall time
  goodput        OK requests meeting every SLO bound / wall time (`--slo ttft=0.5,tpot=0.1`;
                 bounds: ttft, tpot, e2e in seconds, itl = the request's largest gap)
"""
from __future__ import annotations

import math
import os
import platform
import shlex
import sys
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

from serving.loadgen.driver import RequestResult

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "itl", "e2e")


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return None
    return float(np.percentile(arr, q))


def describe(prefix: str, values: Sequence[float]) -> dict[str, float | None]:
    """{prefix_mean_s, prefix_p50_s, prefix_p90_s, prefix_p99_s}."""
    vals = [v for v in values if v is not None]
    out: dict[str, float | None] = {f"{prefix}_mean_s": float(np.mean(vals)) if vals else None}
    for q in PERCENTILES:
        out[f"{prefix}_p{q}_s"] = percentile(vals, q)
    return out


def parse_slo(text: str | None) -> dict[str, float]:
    """"ttft=0.5,tpot=0.1" -> {"ttft": 0.5, "tpot": 0.1} (seconds). Raises ValueError."""
    if not text:
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower().removesuffix("_s")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo: expected KEY=SECONDS with KEY in {SLO_KEYS}, got {part!r}")
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"--slo: {key} must be a number of seconds, got {value!r}") from None
        if not bound > 0 or not math.isfinite(bound):
            raise ValueError(f"--slo: {key} must be > 0, got {value!r}")
        out[key] = bound
    return out


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.ok:
        return False
    checks = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2e": r.e2e_s,
              "itl": max(r.itl_s) if r.itl_s else None}
    for key, bound in slo.items():
        v = checks[key]
        if v is not None and v > bound:
            return False
        if v is None and key in ("ttft", "e2e"):
            return False
    return True


def summarize(results: Sequence[RequestResult], wall_s: float,
              slo: dict[str, float] | None = None) -> dict[str, Any]:
    """The metrics of one run (JSON-ready)."""
    wall_s = max(wall_s, 1e-9)
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in results)
    codes = Counter(r.code for r in results)
    out: dict[str, Any] = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "codes": dict(sorted(codes.items())),
        "duration_s": wall_s,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s,
        "requests_per_s": len(ok) / wall_s,
    }
    out.update(describe("ttft", [r.ttft_s for r in results if r.ttft_s is not None]))
    out.update(describe("itl", [g for r in results for g in r.itl_s]))
    out.update(describe("tpot", [r.tpot_s for r in ok if r.tpot_s is not None]))
    out.update(describe("e2e", [r.e2e_s for r in ok if r.e2e_s is not None]))
    if slo:
        good = sum(1 for r in results if meets_slo(r, slo))
        out["slo"] = dict(slo)
        out["goodput_requests_per_s"] = good / wall_s
        out["slo_attainment"] = good / len(results) if results else None
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def format_table(s: dict[str, Any]) -> str:
    """A human-readable table of `summarize`'s output (latencies in ms)."""
    lines = [f"requests  {s['completed']}/{s['num_requests']} OK   codes {s['codes']}",
             f"duration  {s['duration_s']:.2f} s",
             f"output    {s['output_tokens_per_s']:.1f} tok/s   {s['requests_per_s']:.2f} req/s"
             f"   ({s['output_tokens']} tokens)"]
    if "goodput_requests_per_s" in s:
        att = s["slo_attainment"]
        lines.append(f"goodput   {s['goodput_requests_per_s']:.2f} req/s under {s['slo']}"
                     f"   (attainment {'-' if att is None else f'{att:.1%}'})")
    lines.append(f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for key, name in (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "e2e")):
        lines.append(f"{name:<14}" + "".join(f"{_ms(s.get(f'{key}_{q}_s')):>10}"
                                            for q in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)


# ---- provenance --------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on (CPU model, cores, versions)."""
    info: dict[str, Any] = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                            "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cores_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:   # > cores means other work shared the CPU: timings are then not clean
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def command_line(argv: Sequence[str] | None = None, prog: str | None = None) -> str:
    """The command as typed (shell-quoted). `prog` replaces argv[0] when given."""
    argv = list(sys.argv if argv is None else argv)
    if prog is not None:
        argv = [prog, *argv[1:]] if argv else [prog]
    return shlex.join(argv)
