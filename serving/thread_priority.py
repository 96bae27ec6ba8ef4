"""Thread priority: the compute path of a step runs ahead of the streaming threads on its cores.

Ray starts every worker at nice 15 (`RAY_worker_niceness`). In an engine replica the step loop
then shares its core, at equal weight, with Ray's own threads that serialize and ship every
streamed message, and in the ingress and the gRPC proxy with the threads doing the same. A decode
step is a chain: engine attention, then the expert shards, then the engine again. Each link that
waits for the CPU behind a streaming thread delays all 64 sequences of the batch, while a stream
message that waits a millisecond delays one.

So the engine's step loop and the collective shards' serving threads run at a lower niceness
(`AppConfig.compute_nice`, 5 by default: CFS weight 335 against 36 at nice 15). Measured on this
2-core machine, collective transport, 64 streams x 64 tokens through gRPC, alternating the same
threads between nice 15 and 5 with `renice` on one running cluster: 593/562 tok/s at 15 and
703/726 at 5 (TPOT p50 93-95 ms and 74-75 ms).

Lowering a niceness needs CAP_SYS_NICE (root, or RLIMIT_NICE). Without it nothing changes. A
thread that already runs at the target or better is left alone: this never lowers a priority.
Linux applies niceness per thread (the tid in PRIO_PROCESS), and a new thread inherits its
creator's, which is how a shard's gloo threads follow the thread that builds its group.

Niceness sets shares, not who runs first when a thread wakes up: a thread that wakes preempts
the running one. The serving threads (Ray's I/O threads at nice 0, the gRPC proxy, the event
loops) wake for every streamed message, so at 64 streams the step loop was preempted ~2300 times
in a 3.7 s run and waited 0.58 s in the run queue, each shard's serving thread ~1200 times and
0.3 s (`/proc/<pid>/task/<tid>/schedstat`; compute_nice 0 or -5 changed nothing). So `moe-serve
up` starts the cluster under SCHED_BATCH (`batch_policy`, inherited by Ray's processes and all
their threads): a waking batch thread does not preempt the running one, it waits for the end of
its slice. The compute threads go back to SCHED_OTHER (`compute_policy`: the step loop, with the
OpenMP threads it starts, and the shards' serving and gloo threads), so they still preempt the
serving threads. Measured on one running cluster, bf16, 64 x 64 through gRPC, switching the
serving threads by hand: 1027-1186 tok/s under SCHED_OTHER, 1234-1291 under SCHED_BATCH (two
alternations, three runs each); the step loop's preemptions 2311 -> 1242; one request at a time
ITL p50 12.1-12.9 -> 11.4-12.0 ms. Any user may move a thread between SCHED_OTHER and SCHED_BATCH;
off Linux nothing changes. MOE_SCHED_BATCH=0 leaves the policy alone (for A/B runs).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


def raise_priority(nice: int | None, tid: int = 0) -> int | None:
    """Run thread `tid` (0: the calling thread) at `nice` if it runs at a higher niceness and
    this process may lower it. Returns the niceness it had if it changed, else None."""
    if nice is None:
        return None
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        if before <= nice:
            return None
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return before
    except OSError:          # no CAP_SYS_NICE, or the thread has ended
        return None


def _set_policy(policy: int, tid: int) -> bool:
    try:
        if os.sched_getscheduler(tid) == policy:
            return False
        os.sched_setscheduler(tid, policy, os.sched_param(0))
        return True
    except (OSError, AttributeError):     # the thread has ended, not allowed, or not Linux
        return False


def batch_policy(tid: int = 0) -> bool:
    """Thread `tid` (0: the calling thread; threads and processes it starts inherit it) under
    SCHED_BATCH, unless MOE_SCHED_BATCH=0. True if it changed."""
    if os.environ.get("MOE_SCHED_BATCH", "1") == "0" or not hasattr(os, "SCHED_BATCH"):
        return False
    return _set_policy(os.SCHED_BATCH, tid)


def compute_policy(tid: int = 0) -> bool:
    """Thread `tid` (0: the calling thread) back under SCHED_OTHER if it runs under SCHED_BATCH.
    True if it changed."""
    return thread_policy(tid) == "batch" and _set_policy(os.SCHED_OTHER, tid)


def thread_policy(tid: int = 0) -> str | None:
    """'batch', 'other' or another policy's name for thread `tid`; None if it has ended."""
    try:
        policy = os.sched_getscheduler(tid)
    except (OSError, AttributeError):
        return None
    return {getattr(os, "SCHED_BATCH", -1): "batch", os.SCHED_OTHER: "other"}.get(policy, str(policy))


def thread_nice(tid: int = 0) -> int | None:
    """The niceness of thread `tid` (0: the calling thread); None if it has ended."""
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


@contextmanager
def inherited_priority(nice: int | None) -> Iterator[None]:
    """Threads started inside the block (Python's and native ones, such as gloo's) inherit `nice`
    (as `raise_priority`) and SCHED_OTHER (`compute_policy`); the calling thread gets its own
    niceness and policy back after it."""
    before = raise_priority(nice)
    was_batch = compute_policy()
    try:
        yield
    finally:
        if before is not None:
            os.setpriority(os.PRIO_PROCESS, 0, before)   # raising a niceness needs no right
        if was_batch:
            _set_policy(os.SCHED_BATCH, 0)
