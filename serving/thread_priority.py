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


def thread_nice(tid: int = 0) -> int | None:
    """The niceness of thread `tid` (0: the calling thread); None if it has ended."""
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


@contextmanager
def inherited_priority(nice: int | None) -> Iterator[None]:
    """Threads started inside the block (Python's and native ones, such as gloo's) inherit `nice`
    (as `raise_priority`); the calling thread gets its own niceness back after it."""
    before = raise_priority(nice)
    try:
        yield
    finally:
        if before is not None:
            os.setpriority(os.PRIO_PROCESS, 0, before)   # raising a niceness needs no right
