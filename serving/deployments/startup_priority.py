"""Startup priority: a replica that is starting runs ahead of the busy ones.

Ray starts every worker at nice 15 (`RAY_worker_niceness`). During a spike on shared cores, a
new replica's imports (torch and our modules, ~1.4 s of CPU on an idle machine) and its warm-up
then get one fair share among the busy replicas: it took 11-12 s from process start to its
constructor on 2 busy cores, while the spike waited for exactly that capacity. So the deployment
modules call `boost()` before importing torch, and the replica calls `restore()` once it is ready:
the same idea as systemd's StartupCPUWeight. `moe-serve up` also runs `boost` in every Ray worker's
setup hook (serving/deployments/worker_setup.py, the job's runtime_env): before the worker imports
Ray Serve (~0.6 s of CPU idle, at nice 15 otherwise), so a replica starts boosted from its first import.

Only a thread already running niced (a Ray worker's) is boosted, with the threads it starts, and
only with the right to lower niceness (CAP_SYS_NICE, e.g. root); otherwise nothing changes. A
timer restores the niceness after `max_s` in any case (a process that imported the module but
never builds a replica, such as Serve's app-build task).
"""
from __future__ import annotations

import os
import threading

from serving.thread_priority import raise_priority

BOOST_NICE = 0

_saved_nice: int | None = None
_boosted_tid: int | None = None
_threads_before: frozenset[int] = frozenset()
_lock = threading.Lock()


def boost(max_s: float = 30.0) -> bool:
    """Run the calling thread (and threads it starts) at nice 0 if it runs niced. True if boosted."""
    global _saved_nice, _boosted_tid, _threads_before
    with _lock:
        if _saved_nice is not None:
            return False
        nice = raise_priority(BOOST_NICE)             # None: not niced, or no CAP_SYS_NICE
        if nice is None:
            return False
        _saved_nice, _boosted_tid = nice, threading.get_native_id()
        _threads_before = frozenset(t.native_id for t in threading.enumerate() if t.native_id is not None)
    timer = threading.Timer(max_s, restore)
    timer.daemon = True
    timer.start()
    return True


def restore() -> None:
    """The boosted thread, and the Python threads started since that still run at the boost's
    niceness, back to the niceness it had. Other threads keep theirs: Ray's own I/O threads (nice
    0 in a worker at 15), and threads given a niceness of their own meanwhile (compute_nice)."""
    global _saved_nice
    with _lock:
        if _saved_nice is None:
            return
        since = {t.native_id for t in threading.enumerate()} - _threads_before - {None}
        for tid in {_boosted_tid, *since}:
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) == BOOST_NICE:
                    os.setpriority(os.PRIO_PROCESS, tid, _saved_nice)
            except OSError:                           # the thread just ended
                pass
        _saved_nice = None
