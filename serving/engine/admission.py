"""Admission control: what an engine replica accepts, and the clean "no" it gives otherwise.

Each replica has a bounded queue and a token budget: an admitted request reserves its
prompt + max_tokens until it finishes. Priority classes share the capacity unequally:
`batch` may only use `batch_share` of the queue and of the budget, so under load batch is
shed first while interactive is still admitted. With `max_wait_s`, an interactive request
is also shed when its predicted wait for a slot exceeds that (see `_predicted_wait_s`: the
interactive requests ahead of it, when the running ones free their slots, and how long the
oldest waiting one has waited already): admitted work keeps its TTFT objective. A rejection
is `Overloaded` carrying a retry delay estimated from how fast this replica is draining.
Once admitted, a request is never dropped for load.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

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

    def __init__(self, config: AdmissionConfig, clock=time.monotonic,
                 step_s: Callable[[], float] | None = None):
        """`step_s`: the engine's recent step time (seconds per generated token of a running
        request), read at each interactive admission; None leaves the measured service time alone."""
        self.config = config
        self.clock = clock
        self.step_s = step_s
        self.stats = AdmissionStats()
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        # when each request's service began (admission, then its slot: `started`)
        self._service_from: dict[str, float] = {}
        # the interactive requests in flight, in two ordered maps (oldest first):
        self._unstarted: dict[str, float] = {}   # interactive requests without a first token: admit time (oldest first)
        self._running_since: dict[str, float] = {}   # interactive requests with their slot: start time (oldest first)
        self._service_s = config.prior_service_s   # how long a request holds its slot (EWMA)
        self._measured = False
        self._tokens = 0.0                    # tokens a finished request generated (EWMA; 0: none yet)
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
            wait_s = self._predicted_wait_s(request.sampling.max_tokens) if request.priority is not Priority.BATCH else 0.0
            too_slow = c.max_wait_s > 0 and wait_s > c.max_wait_s
            if in_flight >= queue_cap or self.stats.reserved_tokens + need > budget or too_slow:
                self.stats.rejected_total += 1
                what = ("queue" if in_flight >= queue_cap else "token budget" if not too_slow
                        else f"predicted wait {wait_s:.1f}s > {c.max_wait_s:g}s, queue")
                raise Overloaded(f"engine replica {what} full for {request.priority.name.lower()} "
                                 f"requests ({in_flight} in flight)", retry_after_s=self._retry_after(in_flight))
            now = self.clock()
            self._reserved[request.request_id] = need
            self._service_from[request.request_id] = now
            if request.priority is not Priority.BATCH:
                self._unstarted[request.request_id] = now
            self.stats.reserved_tokens += need
            self.stats.admitted_total += 1
            self.stats.in_flight = len(self._reserved)

    def started(self, request_id: str) -> None:
        """The request has its slot (its first token is out): its service time counts from here, so
        the time it queued is not counted twice in the next prediction (the queue is counted apart)."""
        with self._lock:
            if request_id not in self._service_from:
                return
            now = self.clock()
            self._service_from[request_id] = now
            if self._unstarted.pop(request_id, None) is not None:
                self._running_since[request_id] = now

    def release(self, request_id: str, generated: int | None = None) -> None:
        """The request is done (finished, failed or cancelled); `generated`: the tokens it streamed."""
        with self._lock:
            need = self._reserved.pop(request_id, None)
            if need is None:
                return
            if generated:
                self._tokens = generated if not self._tokens else 0.8 * self._tokens + 0.2 * generated
            self.stats.reserved_tokens -= need
            self.stats.in_flight = len(self._reserved)
            now = self.clock()
            t0 = self._service_from.pop(request_id)   # never started (cancelled queued): admit time
            self._unstarted.pop(request_id, None)
            self._running_since.pop(request_id, None)
            self._service_s = now - t0 if not self._measured else 0.8 * self._service_s + 0.2 * (now - t0)
            self._measured = True
            dt = max(now - self._last_done, 1e-3)
            self._done_rate = 0.8 * self._done_rate + 0.2 * (1.0 / dt)
            self._last_done = now

    def _predicted_wait_s(self, max_tokens: int) -> float:
        """Wait of a new interactive request for a slot. The interactive requests beyond the running
        batch go first (`ahead`, counting itself); running batch requests do not delay it (the
        scheduler preempts them for interactive ones). It is the longest of three estimates:
          - uniform: a batch's worth of slots frees per service time (ahead / slots x service);
          - the slot it will take: the ahead-th oldest running interactive request finishes one
            service time after it started. Requests that started together (a burst, or a new
            replica's first batch) also finish together, which the uniform estimate misses;
          - the queue's head: the oldest interactive request still waiting has waited this long
            already (the service time is measured on requests that started seconds ago, so it lags
            when the engine slows down; the head shows the slowdown as it happens)."""
        ahead = len(self._unstarted) + len(self._running_since) - self.config.max_running + 1
        if ahead > 0:
            service_s = self._service_time_s(max_tokens)
            wait_s = ahead / self.config.max_running * service_s
            starts = list(self._running_since.values())
            if starts:
                wait_s = max(wait_s, starts[min(ahead, len(starts)) - 1] + service_s - self.clock())
        else:
            wait_s = 0.0
        oldest = next(iter(self._unstarted.values()), None)
        return wait_s if oldest is None else max(wait_s, self.clock() - oldest)

    def _service_time_s(self, max_tokens: int) -> float:
        """How long a slot is held: the measured EWMA, or, when the engine's steps have slowed down
        since, the tokens a request generates (measured; `max_tokens` until one finished) times the
        current step time. The EWMA learns of a slowdown only as the slowed requests finish, seconds
        later, and a new replica has only its prior."""
        if self.step_s is None:
            return self._service_s
        return max(self._service_s, (self._tokens or max_tokens) * self.step_s())

    def _retry_after(self, in_flight: int) -> float:
        """Time for the backlog beyond the running batch to drain, at the observed rate."""
        c = self.config
        backlog = max(1, in_flight - c.max_running + 1)
        rate = self._done_rate if self._done_rate > 0 else 1.0
        return min(c.max_retry_after_s, max(c.min_retry_after_s, backlog / rate))
