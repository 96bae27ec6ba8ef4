"""Admission control: what an engine replica accepts, and the clean "no" it gives otherwise.

Each replica has a bounded queue and a token budget: an admitted request reserves its
prompt + max_tokens until it finishes. Priority classes share the capacity unequally:
`batch` may only use `batch_share` of the queue and of the budget, so under load batch is
shed first while interactive is still admitted. With `max_wait_s`, an interactive request
is also shed when the interactive requests ahead of it (the engine schedules interactive
first) would keep it waiting longer than that, or when the oldest interactive request still
waiting for its first token has already waited that long (the engine slowed down, e.g. while a
new replica starts on the same cores, faster than the measured service time can follow):
admitted work keeps its TTFT objective. A rejection is `Overloaded` carrying a
retry delay estimated from how fast this replica is draining. Once admitted, a request is
never dropped for load.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from serving.api.errors import Overloaded
from serving.engine.request import GenerationRequest, Priority


@dataclass(frozen=True, kw_only=True, slots=True)
class AdmissionConfig:
    max_running: int = 16            # = the engine's max_num_seqs (KV slots)
    max_queued: int = 32             # admitted requests waiting for a slot, per replica
    token_budget: int = 1 << 16      # prompt + max_tokens reserved by admitted, unfinished requests
    batch_share: float = 0.5         # share of queue and budget that `batch` requests may use
    max_wait_s: float = 0.0          # interactive: shed if the predicted wait for a slot exceeds this (0 = off)
    prior_service_s: float = 0.0     # how long a request holds its slot, until one has been measured
    min_retry_after_s: float = 0.2
    max_retry_after_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 < self.batch_share <= 1.0:
            raise ValueError(f"batch_share must be in (0, 1], got {self.batch_share}")
        if self.max_running < 1 or self.max_queued < 0 or self.token_budget < 1:
            raise ValueError(f"invalid admission limits: {self}")


@dataclass(slots=True)
class AdmissionStats:
    admitted_total: int = 0
    rejected_total: int = 0
    in_flight: int = 0
    reserved_tokens: int = 0


class AdmissionController:
    """Thread-safe. `admit` raises Overloaded or reserves; `release` returns the reservation."""

    def __init__(self, config: AdmissionConfig, clock=time.monotonic):
        self.config = config
        self.clock = clock
        self.stats = AdmissionStats()
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        # when each request's service began (admission, then its slot: `started`) and its class
        self._service_from: dict[str, tuple[float, Priority]] = {}
        self._interactive = 0                 # interactive requests in flight
        self._unstarted: dict[str, float] = {}   # interactive requests without a first token: admit time (oldest first)
        self._service_s = config.prior_service_s   # how long a request holds its slot (EWMA)
        self._measured = False
        self._done_rate = 0.0                 # finished requests per second (EWMA)
        self._last_done = clock()

    def admit(self, request: GenerationRequest) -> None:
        c = self.config
        need = len(request.prompt_token_ids) + request.sampling.max_tokens
        share = c.batch_share if request.priority is Priority.BATCH else 1.0
        with self._lock:
            in_flight = len(self._reserved)
            queue_cap = c.max_running + math.floor(c.max_queued * share)
            budget = math.floor(c.token_budget * share)
            wait_s = self._predicted_wait_s() if request.priority is not Priority.BATCH else 0.0
            too_slow = c.max_wait_s > 0 and wait_s > c.max_wait_s
            if in_flight >= queue_cap or self.stats.reserved_tokens + need > budget or too_slow:
                self.stats.rejected_total += 1
                what = ("queue" if in_flight >= queue_cap else "token budget" if not too_slow
                        else f"predicted wait {wait_s:.1f}s > {c.max_wait_s:g}s, queue")
                raise Overloaded(f"engine replica {what} full for {request.priority.name.lower()} "
                                 f"requests ({in_flight} in flight)", retry_after_s=self._retry_after(in_flight))
            self._reserved[request.request_id] = need
            self._service_from[request.request_id] = (self.clock(), request.priority)
            if request.priority is not Priority.BATCH:
                self._interactive += 1
                self._unstarted[request.request_id] = self.clock()
            self.stats.reserved_tokens += need
            self.stats.admitted_total += 1
            self.stats.in_flight = len(self._reserved)

    def started(self, request_id: str) -> None:
        """The request has its slot (its first token is out): its service time counts from here, so
        the time it queued is not counted twice in the next prediction (the queue is counted apart)."""
        with self._lock:
            self._unstarted.pop(request_id, None)
            if request_id in self._service_from:
                self._service_from[request_id] = (self.clock(), self._service_from[request_id][1])

    def release(self, request_id: str) -> None:
        with self._lock:
            need = self._reserved.pop(request_id, None)
            if need is None:
                return
            self.stats.reserved_tokens -= need
            self.stats.in_flight = len(self._reserved)
            now = self.clock()
            t0, priority = self._service_from.pop(request_id)   # never started (cancelled queued): admit time
            self._unstarted.pop(request_id, None)
            self._interactive -= priority is not Priority.BATCH
            self._service_s = now - t0 if not self._measured else 0.8 * self._service_s + 0.2 * (now - t0)
            self._measured = True
            dt = max(now - self._last_done, 1e-3)
            self._done_rate = 0.8 * self._done_rate + 0.2 * (1.0 / dt)
            self._last_done = now

    def _predicted_wait_s(self) -> float:
        """Wait of a new interactive request for a slot: the interactive requests beyond the
        running batch go first, a batch's worth per service time (the prior until one finished).
        Running batch requests do not delay it: the scheduler preempts them for interactive ones.
        At least as long as the oldest interactive request still waiting has waited: the service
        time is measured on requests that started seconds ago, so it lags when the engine slows
        down; the queue's head shows the slowdown as it happens."""
        ahead = self._interactive - self.config.max_running + 1
        model_s = max(0, ahead) / self.config.max_running * self._service_s
        oldest = next(iter(self._unstarted.values()), None)
        return model_s if oldest is None else max(model_s, self.clock() - oldest)

    def _retry_after(self, in_flight: int) -> float:
        """Time for the backlog beyond the running batch to drain, at the observed rate."""
        c = self.config
        backlog = max(1, in_flight - c.max_running + 1)
        rate = self._done_rate if self._done_rate > 0 else 1.0
        return min(c.max_retry_after_s, max(c.min_retry_after_s, backlog / rate))
