"""LoadWindow: a replica's recent load, as rates and quantiles over a sliding time window.

What the autoscaling policies read (through `record_autoscaling_stats`): arrivals per second
(shed requests included, so a full admission queue cannot hide demand), completions per
second, TTFT quantiles, and for expert shards tokens per second and busy fraction.
"""
from __future__ import annotations

import threading
import time
from collections import deque


class LoadWindow:
    def __init__(self, window_s: float = 5.0, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._lock = threading.Lock()
        self._events: dict[str, deque[tuple[float, float]]] = {}   # kind -> (time, value)

    def add(self, kind: str, value: float = 1.0) -> None:
        now = self.clock()
        with self._lock:
            q = self._events.setdefault(kind, deque())
            q.append((now, value))
            self._trim(q, now)

    def rate(self, kind: str) -> float:
        """Sum of `kind` values per second over the window."""
        return self.total(kind) / self.window_s

    def total(self, kind: str) -> float:
        return sum(self._values(kind))

    def quantile(self, kind: str, q: float) -> float:
        """The q-quantile of `kind` values in the window (0.0 when there are none)."""
        vals = sorted(self._values(kind))
        if not vals:
            return 0.0
        return vals[min(len(vals) - 1, int(q * len(vals)))]

    def _values(self, kind: str) -> list[float]:
        """The `kind` values still inside the window."""
        now = self.clock()
        with self._lock:
            events = self._events.get(kind)
            if not events:
                return []
            self._trim(events, now)
            return [v for _, v in events]

    def _trim(self, q: deque, now: float) -> None:
        while q and q[0][0] < now - self.window_s:
            q.popleft()
