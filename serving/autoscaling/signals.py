"""What the autoscaler sees: metric keys replicas report, and the plain Signals the policies read.

Replicas report through Serve's `record_autoscaling_stats(self) -> dict[str, float]`; the keys
below are the contract between the deployments (which write them) and the Ray adapter (which
reads them back out of `AutoscalingContext.raw_metrics` / `aggregated_metrics`). No Ray here.
"""
from __future__ import annotations

from dataclasses import dataclass

# ---- EngineReplica -> record_autoscaling_stats() keys (per replica, instantaneous) ----------------
ENGINE_QUEUE_DEPTH = "queue_depth"                          # requests admitted, waiting for a batch slot
ENGINE_RUNNING = "running"                                  # requests holding a batch slot (decoding/prefilling)
ENGINE_PREFILL_TOKENS_WAITING = "prefill_tokens_waiting"    # prompt tokens not yet prefilled (queued + partial)
ENGINE_TTFT_P90_S = "ttft_p90_s"                            # p90 TTFT over the replica's recent window, seconds
ENGINE_TTFT_P99_S = "ttft_p99_s"                            # p99 TTFT over the same window, seconds
ENGINE_ARRIVALS_PER_S = "arrivals_per_s"                    # requests offered per second, shed ones included
ENGINE_COMPLETED_PER_S = "completed_per_s"                  # requests finished per second
ENGINE_KEYS = (ENGINE_QUEUE_DEPTH, ENGINE_RUNNING, ENGINE_PREFILL_TOKENS_WAITING,
               ENGINE_TTFT_P90_S, ENGINE_TTFT_P99_S, ENGINE_ARRIVALS_PER_S, ENGINE_COMPLETED_PER_S)

# ---- ExpertShard -> record_autoscaling_stats() keys (per replica) ---------------------------------
SHARD_TOKENS_PER_S = "tokens_per_s"     # tokens routed to this replica's experts per second (recent window)
SHARD_BUSY_FRACTION = "busy_fraction"   # fraction of wall time spent in expert GEMMs (recent window), 0..1
SHARD_KEYS = (SHARD_TOKENS_PER_S, SHARD_BUSY_FRACTION)


def engine_autoscaling_stats(*, queue_depth: float, running: float, prefill_tokens_waiting: float = 0.0,
                             ttft_p90_s: float = 0.0, ttft_p99_s: float | None = None,
                             arrivals_per_s: float = 0.0, completed_per_s: float = 0.0) -> dict[str, float]:
    """The dict an EngineReplica's `record_autoscaling_stats` returns (all values float, as Serve requires).

    Rates and TTFT quantiles are over the replica's recent window (a few seconds, e.g. since the
    previous call); `arrivals_per_s` counts requests the admission controller rejected too."""
    return {ENGINE_QUEUE_DEPTH: float(queue_depth), ENGINE_RUNNING: float(running),
            ENGINE_PREFILL_TOKENS_WAITING: float(prefill_tokens_waiting),
            ENGINE_TTFT_P90_S: float(ttft_p90_s),
            ENGINE_TTFT_P99_S: float(ttft_p90_s if ttft_p99_s is None else ttft_p99_s),
            ENGINE_ARRIVALS_PER_S: float(arrivals_per_s), ENGINE_COMPLETED_PER_S: float(completed_per_s)}


def shard_autoscaling_stats(*, tokens_per_s: float, busy_fraction: float = 0.0) -> dict[str, float]:
    """The dict an ExpertShard's `record_autoscaling_stats` returns."""
    return {SHARD_TOKENS_PER_S: float(tokens_per_s), SHARD_BUSY_FRACTION: float(busy_fraction)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Signals:
    """One deployment's load at `now`, summed over its running replicas (the engine policy's input).

    `running_replicas` serve traffic now; `target_replicas` is what was last ordered (running +
    still cold-starting). None means "unknown": the policy then falls back to its own memory of
    pending orders (PolicyState.pending).
    """
    now: float                              # seconds (any monotonic origin)
    running_replicas: int
    target_replicas: int | None = None
    queue_depth: float = 0.0                # waiting requests, all replicas
    running_requests: float = 0.0           # requests in a batch, all replicas
    prefill_tokens_waiting: float = 0.0
    ttft_p90_s: float = 0.0                 # 0 when no request got a first token in the window
    ttft_p99_s: float = 0.0
    arrivals_per_s: float = 0.0             # offered (admitted + shed); 0 = not reported
    completed_per_s: float = 0.0            # finished; 0 = not reported
    seconds_since_last_change: float | None = None   # informational (Serve's last scale time)


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardSignals:
    """One ExpertShard deployment's token load at `now` (the shard policy's input)."""
    now: float
    running_replicas: int
    target_replicas: int | None = None
    tokens_per_s: float = 0.0               # summed over the shard's replicas
    busy_fraction: float = 0.0              # summed over replicas (== busy replica-equivalents)
    seconds_since_last_change: float | None = None
