"""AsyncEngine's failure handling, with a fake engine (no model): transient transport errors
are retried, bugs fail the affected requests at once, and the loop keeps serving."""
import asyncio
import time

from serving.engine.async_engine import AsyncEngine, EngineError, ExpertsUnreachable
from serving.engine.request import FinishReason, TokenEvent


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
        assert not isinstance(eng.failed_with[0], ExpertsUnreachable)      # a bug: INTERNAL
        assert "KeyError" in str(eng.failed_with[0])
    finally:
        ae.shutdown()


def test_transient_errors_give_up_after_the_retry_window():
    eng = FakeEngine([Transient()] * 1000)
    ae = AsyncEngine(eng, step_retry_s=0.5, retryable=(Transient,))
    try:
        assert _wait(lambda: eng.failed_with)
        assert "failing for" in str(eng.failed_with[0])
        assert isinstance(eng.failed_with[0], ExpertsUnreachable)          # an outage: UNAVAILABLE
    finally:
        ae.shutdown()


class TokenEngine:
    """Emits one token per step to every request (n tokens each, the last one finishes)."""

    def __init__(self, n):
        self.n, self.requests = n, []

    def add_request(self, request, emit):
        self.requests.append([request, emit, 0])

    def abort(self, request_id):
        self.requests = [r for r in self.requests if r[0].request_id != request_id]

    def has_work(self):
        return bool(self.requests)

    def step(self):
        time.sleep(0.002)
        for r in list(self.requests):
            r[2] += 1
            done = r[2] == self.n
            r[1](TokenEvent(request_id=r[0].request_id, token_id=r[2], text_delta=str(r[2]),
                            finish_reason=FinishReason.LENGTH if done else None))
            if done:
                self.requests.remove(r)

    def fail_all(self, error):
        self.requests = []


def _chunks(chunk_tokens, max_hold_s, n=10):
    from serving.engine.request import GenerationRequest
    from serving.model.sampling import SamplingParams
    ae = AsyncEngine(TokenEngine(n))

    async def run():
        req = GenerationRequest(request_id="r", prompt_token_ids=(1,), sampling=SamplingParams(max_tokens=n))
        return [[ev.token_id for ev in c] async for c in ae.stream_chunks(req, chunk_tokens, max_hold_s)]
    try:
        return asyncio.run(asyncio.wait_for(run(), 10))
    finally:
        ae.shutdown()


def test_stream_chunks_sends_the_first_token_alone_then_chunks_and_loses_nothing():
    chunks = _chunks(chunk_tokens=4, max_hold_s=10.0)
    assert chunks[0] == [1]
    assert all(1 <= len(c) <= 4 for c in chunks) and len(chunks) < 10
    assert [t for c in chunks for t in c] == list(range(1, 11))


def test_stream_chunks_never_holds_a_token_past_max_hold():
    assert _chunks(chunk_tokens=4, max_hold_s=0.0) == [[t] for t in range(1, 11)]


def test_stream_chunks_asks_a_callable_chunk_size_at_every_token():
    sizes = iter([1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    chunks = _chunks(chunk_tokens=lambda: next(sizes), max_hold_s=10.0)
    assert chunks[:2] == [[1], [2]] and max(len(c) for c in chunks) == 3
    assert [t for c in chunks for t in c] == list(range(1, 11))


class CountingTokenEngine(TokenEngine):
    def __init__(self, n):
        super().__init__(n)
        self.steps = 0

    def step(self):
        self.steps += 1
        super().step()


def test_a_steps_events_wake_the_event_loop_once_and_every_stream_gets_all_its_tokens():
    from serving.engine.request import GenerationRequest
    from serving.model.sampling import SamplingParams
    eng, n, streams = CountingTokenEngine(12), 12, 16
    ae = AsyncEngine(eng)
    wakeups = []

    async def run():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (wakeups.append(1), real(*a, **k))[1]

        async def one(i):
            req = GenerationRequest(request_id=f"r{i}", prompt_token_ids=(1,), sampling=SamplingParams(max_tokens=n))
            return [ev.token_id async for ev in ae.stream(req)]
        return await asyncio.gather(*(one(i) for i in range(streams)))
    try:
        got = asyncio.run(asyncio.wait_for(run(), 10))
    finally:
        ae.shutdown()
    assert got == [list(range(1, n + 1))] * streams
    # 16 x 12 = 192 events; one hand-off per step that emitted (at most one per step)
    assert 0 < len(wakeups) <= eng.steps < streams * n, (len(wakeups), eng.steps)
