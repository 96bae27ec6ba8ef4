"""Engine step phases (serving/engine/step_phases.py) and the shard busy time, from the engine's
counters through EngineSampler to the Prometheus families."""
from __future__ import annotations

import time

import pytest
import torch

from serving.deployments.config import AppConfig
from serving.deployments.engine_replica import EngineSampler, build_engine
from serving.engine.request import GenerationRequest
from serving.engine.step_phases import PHASES, TimedDispatch, step_phases
from serving.metrics import EngineSample, MetricsHub, MetricsReport
from serving.model.checkpoint import write_checkpoint
from serving.model.config import MoEConfig
from serving.model.sampling import SamplingParams
from serving.parallel.placement import Placement

SLOW_S = 0.005          # added to every expert dispatch in the engine tests


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_checkpoint("mixtral", "tiny", tmp_path_factory.mktemp("ckpt"), seed=0)


def _engine(checkpoint, shards: int = 1):
    placement = Placement.build(MoEConfig.from_dir(checkpoint), shards, "contiguous")
    return build_engine(AppConfig(checkpoint=str(checkpoint), expert_shards=shards, transport="local"), placement)


def _slow(dispatch):
    """The engine's dispatch with SLOW_S more per call, counting the calls."""
    calls = []

    def slow(layer, *args):
        time.sleep(SLOW_S)
        calls.append(layer)
        return dispatch(layer, *args)
    return slow, calls


def _run(engine, max_tokens: int = 4) -> float:
    """One greedy request to its end; the wall time of its steps. An idle step first: the engine's
    first step builds its GEMM kernels (`kernel_warm_up`, outside every phase and, on a loaded
    machine, more than half the wall time of the steps that follow)."""
    assert engine.step() == 0
    engine.add_request(GenerationRequest(request_id="r", prompt_token_ids=(5, 6, 7, 8, 9),
                                         sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                 ignore_eos=True)), lambda ev: None)
    wall = 0.0
    for _ in range(max_tokens + 2):
        t0 = time.perf_counter()
        n = engine.step()
        wall += time.perf_counter() - t0
        if not n:
            break
    return wall


class _SleepyPending:
    def __init__(self, value):
        self.value = value

    def wait(self):
        time.sleep(0.01)
        return self.value


class _SleepyDispatch:
    overlaps = True

    def __call__(self, layer, x, ids, w):
        time.sleep(0.01)
        return x

    def submit(self, layer, x, ids, w):
        time.sleep(0.01)
        return _SleepyPending(x)


def test_timed_dispatch_counts_calls_submits_and_waits():
    timed = TimedDispatch(_SleepyDispatch())
    assert timed.overlaps and timed.seconds == 0.0 and timed.last_return is None
    x = torch.ones(2, 3)
    assert timed(0, x, None, None) is x
    after_call = timed.seconds
    assert after_call >= 0.01
    pending = timed.submit(1, x, None, None)
    assert timed.seconds >= after_call + 0.01
    assert pending.wait() is x
    assert timed.seconds >= after_call + 0.02
    assert timed.last_return is not None and timed.last_return <= time.perf_counter()


def test_timed_dispatch_counts_a_call_that_raises():
    def boom(*a):
        time.sleep(0.01)
        raise RuntimeError("shard gone")
    timed = TimedDispatch(boom)
    with pytest.raises(RuntimeError, match="shard gone"):
        timed(0, None, None, None)
    assert timed.seconds >= 0.01


def test_phases_add_up_to_the_step():
    timed = TimedDispatch(None)
    timed.seconds, timed.last_return = 0.030, 10.080
    p = step_phases(10.000, 10.002, 10.100, 10.104, timed)
    assert set(p) == set(PHASES)
    assert p["schedule"] == pytest.approx(0.002) and p["experts"] == pytest.approx(0.030)
    assert p["head"] == pytest.approx(0.020) and p["sample"] == pytest.approx(0.004)
    assert p["dense"] == pytest.approx(0.098 - 0.030 - 0.020)
    assert sum(p.values()) == pytest.approx(0.104)
    # a step with no MoE layer: no head, the forward is all dense
    p = step_phases(0.0, 0.001, 0.011, 0.012, TimedDispatch(None))
    assert p["head"] == 0.0 and p["experts"] == 0.0 and p["dense"] == pytest.approx(0.010)


def test_engine_accounts_every_step_by_phase(tiny_checkpoint):
    engine, _ = _engine(tiny_checkpoint)
    engine.dispatch, calls = _slow(engine.dispatch)
    totals = engine.stats.phase_seconds_total
    assert set(totals) == set(PHASES) and not any(totals.values())
    wall = _run(engine)
    assert engine.stats.steps_total == 4 and len(calls) == 4 * len(engine.model.config.moe_layer_ids)
    assert totals["experts"] >= SLOW_S * len(calls)
    assert all(totals[p] > 0 for p in PHASES), totals
    # the phases cover the steps: all of them, and nothing outside them
    assert 0.5 * wall <= sum(totals.values()) <= wall
    # the forward's own work is dense + head; the sleeps are in the experts phase only
    assert totals["dense"] + totals["head"] < wall - SLOW_S * len(calls)


def test_sampler_reports_deltas_and_the_hub_exports_them(tiny_checkpoint):
    engine, dispatcher = _engine(tiny_checkpoint, shards=2)
    _run(engine)                                   # before the sampler: not reported
    sampler = EngineSampler(engine, dispatcher)
    before = dict(engine.stats.phase_seconds_total)
    busy_before = dispatcher.shard_busy_seconds()
    query_before, hits_before = engine.stats.prefix_query_tokens_total, engine.stats.prefix_hit_tokens_total
    assert set(busy_before) == {0, 1} and all(v > 0 for v in busy_before.values())
    _run(engine)
    sample = sampler()
    for p in PHASES:
        assert sample.phase_seconds[p] == pytest.approx(engine.stats.phase_seconds_total[p] - before[p])
        assert sample.phase_seconds[p] > 0
    busy_now = dispatcher.shard_busy_seconds()
    assert sample.shard_busy_seconds == pytest.approx({s: busy_now[s] - busy_before[s] for s in (0, 1)})
    assert all(v > 0 for v in sample.shard_busy_seconds.values())
    # the shards' compute is part of the engine's experts phase (local transport: same thread)
    assert sum(sample.shard_busy_seconds.values()) <= sample.phase_seconds["experts"]
    # every request of _run joins with its prompt looked up in the prefix cache (on by default)
    assert sample.prefix_query_tokens == engine.stats.prefix_query_tokens_total - query_before > 0
    assert sample.prefix_hit_tokens == engine.stats.prefix_hit_tokens_total - hits_before
    idle = sampler()
    assert not any(idle.phase_seconds.values()) and not any(idle.shard_busy_seconds.values())
    assert idle.prefix_query_tokens == idle.prefix_hit_tokens == 0

    hub = MetricsHub()
    hub.apply(MetricsReport("engine-0", engine=sample))
    hub.apply(MetricsReport("engine-1", engine=EngineSample(phase_seconds={"dense": 1.5},
                                                            shard_busy_seconds={0: 0.25})))
    m = hub.metrics
    # each replica's own series: a slow replica is told apart from the rest
    assert m.step_phase.labels("engine-0", "dense")._value.get() == pytest.approx(sample.phase_seconds["dense"])
    assert m.step_phase.labels("engine-1", "dense")._value.get() == pytest.approx(1.5)
    assert m.step_phase.labels("engine-0", "head")._value.get() == pytest.approx(sample.phase_seconds["head"])
    assert m.shard_busy.labels("engine-0", "0")._value.get() == pytest.approx(sample.shard_busy_seconds[0])
    assert m.shard_busy.labels("engine-1", "0")._value.get() == pytest.approx(0.25)
    assert m.prefix_query_tokens.labels("engine-0")._value.get() == sample.prefix_query_tokens
    assert m.prefix_hit_tokens.labels("engine-0")._value.get() == sample.prefix_hit_tokens


def test_sampler_never_reports_a_negative_busy_time(tiny_checkpoint):
    engine, dispatcher = _engine(tiny_checkpoint)
    counts = iter([{0: 5.0}, {0: 6.0, 1: 0.5}, {0: 5.5, 1: 0.75}])   # shard 1 appears; a count goes back
    dispatcher.shard_busy_seconds = lambda: next(counts)
    sampler = EngineSampler(engine, dispatcher)
    assert sampler().shard_busy_seconds == {0: 1.0, 1: 0.5}
    assert sampler().shard_busy_seconds == {0: 0.0, 1: 0.25}
