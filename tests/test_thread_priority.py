"""serving/thread_priority.py on real threads: niceness is per thread on Linux."""
from __future__ import annotations

import os
import threading

import pytest

from serving.deployments.config import AppConfig
from serving.thread_priority import (batch_policy, compute_policy, inherited_priority, raise_priority,
                                     thread_nice, thread_policy)


def _may_lower_nice() -> bool:
    """True if this process may lower a niceness (CAP_SYS_NICE), tried on a scratch thread."""
    result = []

    def probe():
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 18)
            result.append(True)
        except OSError:
            result.append(False)
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return result[0]


class _Parked:
    """A thread that sets its own niceness, then waits until released (so its tid stays valid)."""

    def __init__(self, nice: int, body=None):
        self.ready, self.release, self.seen = threading.Event(), threading.Event(), {}
        self.body = body
        self.thread = threading.Thread(target=self._run, args=(nice,))
        self.thread.start()
        assert self.ready.wait(5)

    def _run(self, nice: int) -> None:
        os.setpriority(os.PRIO_PROCESS, 0, nice)    # raising a niceness needs no right
        if self.body:
            self.body(self.seen)
        self.ready.set()
        self.release.wait(5)

    def close(self) -> None:
        self.release.set()
        self.thread.join(5)


needs_cap = pytest.mark.skipif(not _may_lower_nice(), reason="needs CAP_SYS_NICE")


@needs_cap
def test_raise_priority_lowers_one_threads_niceness_only():
    parked = _Parked(15)
    try:
        tid = parked.thread.native_id
        assert raise_priority(5, tid) == 15          # it had 15
        assert thread_nice(tid) == 5
        assert thread_nice() == os.getpriority(os.PRIO_PROCESS, 0)   # the caller is untouched
    finally:
        parked.close()


def test_raise_priority_never_lowers_a_priority_and_none_is_off():
    parked = _Parked(3)
    try:
        tid = parked.thread.native_id
        assert raise_priority(5, tid) is None         # 3 is already ahead of 5: left alone
        assert thread_nice(tid) == 3
        assert raise_priority(None, tid) is None
        assert thread_nice(tid) == 3
    finally:
        parked.close()


@needs_cap
def test_inherited_priority_reaches_new_threads_and_gives_the_caller_its_own_back():
    def body(seen):
        with inherited_priority(5):
            seen["inside"] = thread_nice()
            child = threading.Thread(target=lambda: seen.setdefault("child", thread_nice()))
            child.start()
            child.join()
        seen["after"] = thread_nice()
    parked = _Parked(15, body)
    try:
        assert parked.seen == {"inside": 5, "child": 5, "after": 15}
    finally:
        parked.close()


def test_thread_nice_of_no_such_thread_is_none():
    assert thread_nice(2 ** 22 + 12345) is None     # above Linux's largest pid_max


def test_compute_nice_config_is_validated():
    base = {"checkpoint": "x"}
    assert AppConfig.from_args(base).compute_nice == 5
    assert AppConfig.from_args({**base, "compute_nice": None}).compute_nice is None
    with pytest.raises(ValueError, match="compute_nice"):
        AppConfig.from_args({**base, "compute_nice": 25})


def _in_thread(fn):
    """fn() on a fresh thread (policies are per thread); its result."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(5)
    return out[0]


def test_batch_policy_is_inherited_by_new_threads_and_compute_policy_undoes_it(monkeypatch):
    monkeypatch.delenv("MOE_SCHED_BATCH", raising=False)

    def body():
        seen = {"start": thread_policy(), "changed": batch_policy(), "after": thread_policy(),
                "again": batch_policy()}                                   # already batch: no change
        seen["child"] = _in_thread(thread_policy)                          # a new thread inherits it
        seen["child_compute"] = _in_thread(lambda: (compute_policy(), thread_policy()))
        seen["back"], seen["now"] = compute_policy(), thread_policy()
        seen["back_again"] = compute_policy()                              # already other: no change
        return seen
    assert _in_thread(body) == {"start": "other", "changed": True, "after": "batch", "again": False,
                                "child": "batch", "child_compute": (True, "other"),
                                "back": True, "now": "other", "back_again": False}
    assert thread_policy() == "other"                                     # the test's own thread untouched


def test_batch_policy_off_by_environment(monkeypatch):
    monkeypatch.setenv("MOE_SCHED_BATCH", "0")
    assert _in_thread(lambda: (batch_policy(), thread_policy())) == (False, "other")


def test_inherited_priority_starts_compute_threads_under_sched_other_from_a_batch_caller(monkeypatch):
    monkeypatch.delenv("MOE_SCHED_BATCH", raising=False)

    def body():
        batch_policy()
        with inherited_priority(None):
            inside = thread_policy()
            child = _in_thread(thread_policy)
        return inside, child, thread_policy()
    assert _in_thread(body) == ("other", "other", "batch")    # the caller gets its policy back


def test_thread_policy_of_no_such_thread_is_none():
    assert thread_policy(2 ** 22 + 12345) is None
    assert compute_policy(2 ** 22 + 12345) is False
