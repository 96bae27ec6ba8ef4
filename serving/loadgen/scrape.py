"""Read the cluster's Prometheus endpoint: queue depth and replicas per deployment.

A small, tolerant parser of the text exposition format (comments and malformed lines
are skipped; missing families give None, never an error), and `ClusterSnapshot`, the
few numbers the load test records each second:

| field          | ours (serving/metrics.py)                          | fallback (Ray's own)                       |
|----------------|----------------------------------------------------|--------------------------------------------|
| queue_depth    | sum of moe_serve_queue_depth                       | sum of ray_serve_deployment_queued_queries |
| running        | sum of moe_serve_running_requests                  | -                                          |
| replicas[d]    | moe_serve_deployment_replicas{deployment=d}        | ray_serve_deployment_replica_healthy summed per deployment |
| desired[d]     | moe_serve_autoscaling_desired_replicas{deployment=d} | ray_serve_autoscaling_desired_replicas   |
"""
from __future__ import annotations

import math
import re
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

_LINE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_exposition(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition; bad lines are skipped."""
    out: list[Sample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE_RE.match(line)
        if not m:
            continue
        name, _, label_text, value_text = m.groups()
        try:
            value = float(value_text)
        except ValueError:
            continue
        labels: dict[str, str] = {}
        if label_text:
            for lm in _LABEL_RE.finditer(label_text):
                labels[lm.group(1)] = re.sub(r'\\[\\"n]', lambda x: _UNESCAPE[x.group(0)], lm.group(2))
        out.append(Sample(name, labels, value))
    return out


def fetch(url: str, timeout_s: float = 1.0) -> str | None:
    """The exposition text at `url`, or None if it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:   # noqa: S310 - loopback URL
            return resp.read().decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - a missing endpoint is a blank column, not a failure
        return None


def _deployment(labels: dict[str, str]) -> str | None:
    return labels.get("deployment") or labels.get("deployment_name")


@dataclass(slots=True)
class ClusterSnapshot:
    queue_depth: float | None = None
    running: float | None = None
    replicas: dict[str, float] = field(default_factory=dict)
    desired: dict[str, float] = field(default_factory=dict)
    routed_by_shard: dict[int, float] = field(default_factory=dict)   # tokens routed so far (counter)

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> "ClusterSnapshot":
        by_name: dict[str, list[Sample]] = defaultdict(list)
        for s in samples:
            if math.isfinite(s.value):
                by_name[s.name].append(s)

        def total(*names: str) -> float | None:
            for n in names:
                if by_name.get(n):
                    return sum(s.value for s in by_name[n])
            return None

        def per_deployment(*names: str) -> dict[str, float]:
            for n in names:
                got: dict[str, float] = defaultdict(float)
                for s in by_name.get(n, ()):
                    d = _deployment(s.labels)
                    if d is not None:
                        got[d] += s.value
                if got:
                    return dict(got)
            return {}

        routed: dict[int, float] = defaultdict(float)
        for smp in by_name.get("moe_serve_expert_routed_tokens_total", ()):
            if smp.labels.get("shard", "").isdigit():
                routed[int(smp.labels["shard"])] += smp.value
        return cls(
            routed_by_shard=dict(routed),
            queue_depth=total("moe_serve_queue_depth", "ray_serve_deployment_queued_queries"),
            running=total("moe_serve_running_requests"),
            replicas=per_deployment("moe_serve_deployment_replicas",
                                    "ray_serve_deployment_replica_healthy"),
            desired=per_deployment("moe_serve_autoscaling_desired_replicas",
                                   "ray_serve_autoscaling_desired_replicas",
                                   "ray_serve_autoscaling_target_replicas"))

    @classmethod
    def from_text(cls, text: str | None) -> "ClusterSnapshot":
        return cls.from_samples(parse_exposition(text)) if text else cls()


def scrape(url: str | None, timeout_s: float = 1.0) -> ClusterSnapshot:
    """A snapshot of the cluster (all None / empty if the URL is None or unreachable)."""
    return ClusterSnapshot.from_text(fetch(url, timeout_s)) if url else ClusterSnapshot()


def engine_deployment(names) -> str | None:
    """The engine's deployment among `names` (the one whose name contains "engine")."""
    names = sorted(names)
    for n in names:
        if "engine" in n.lower():
            return n
    return None
