"""AsyncEngine's failure handling, with a fake engine (no model): transient transport errors
are retried, bugs fail the affected requests at once, and the loop keeps serving."""
import time

from serving.engine.async_engine import AsyncEngine, EngineError


class Transient(Exception):
    pass


class FakeEngine:
    def __init__(self, failures):
        self.failures = list(failures)     # exceptions to raise from the next steps
        self.steps = 0
        self.failed_with = []
        self.work = True

    def has_work(self):
        return self.work

    def step(self):
        self.steps += 1
        if self.failures:
            raise self.failures.pop(0)
        self.work = False

    def fail_all(self, error):
        self.failed_with.append(error)
        self.work = False


def _wait(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        time.sleep(0.01)
    return pred()


def test_transient_errors_are_retried_until_the_step_succeeds():
    eng = FakeEngine([Transient(), Transient()])
    ae = AsyncEngine(eng, retryable=(Transient,))
    try:
        assert _wait(lambda: not eng.work)
        assert eng.steps == 3 and eng.failed_with == []
    finally:
        ae.shutdown()


def test_bug_fails_requests_at_once():
    eng = FakeEngine([KeyError("boom")])
    ae = AsyncEngine(eng, retryable=(Transient,))
    try:
        assert _wait(lambda: eng.failed_with)
        assert eng.steps == 1 and isinstance(eng.failed_with[0], EngineError)
        assert "KeyError" in str(eng.failed_with[0])
    finally:
        ae.shutdown()


def test_transient_errors_give_up_after_the_retry_window():
    eng = FakeEngine([Transient()] * 1000)
    ae = AsyncEngine(eng, step_retry_s=0.5, retryable=(Transient,))
    try:
        assert _wait(lambda: eng.failed_with)
        assert "failing for" in str(eng.failed_with[0])
    finally:
        ae.shutdown()
