"""WithThreads: one call runs on its own torch thread count, and the caller's count comes back."""
from __future__ import annotations

import pytest
import torch

from serving.deployments.config import AppConfig
from serving.deployments.engine_replica import build_engine
from serving.engine.request import GenerationRequest
from serving.engine.torch_threads import StepThreads, WithThreads
from serving.model.checkpoint import write_checkpoint
from serving.model.config import MoEConfig
from serving.model.linear import Linear
from serving.model.sampling import SamplingParams
from serving.parallel.placement import Placement


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_checkpoint("mixtral", "tiny", tmp_path_factory.mktemp("ckpt"), seed=0)


def _engine(checkpoint, **cfg):
    placement = Placement.build(MoEConfig.from_dir(checkpoint), 1, "contiguous")
    engine, _ = build_engine(AppConfig(checkpoint=str(checkpoint), expert_shards=1, transport="local", **cfg),
                             placement)
    return engine


def _generate(engine, prompt: tuple[int, ...], max_tokens: int) -> int:
    """Run one greedy request to its end on `engine`; the number of tokens it produced."""
    tokens = []
    engine.add_request(GenerationRequest(request_id="r", prompt_token_ids=prompt,
                                         sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                 ignore_eos=True)),
                       tokens.append)
    for _ in range(10):
        if not engine.step():
            break
    return len([t for t in tokens if t.token_id >= 0])


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_call_sees_its_threads_and_restores_the_callers(one_thread):
    seen = []
    f = WithThreads(lambda x: (seen.append(torch.get_num_threads()), x * 2)[1], threads=2)
    out = f(torch.ones(3))
    assert seen == [2] and torch.equal(out, torch.full((3,), 2.0))
    assert torch.get_num_threads() == 1


def test_restores_the_count_when_the_call_raises(one_thread):
    def boom(x):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        WithThreads(boom, threads=2)(torch.ones(1))
    assert torch.get_num_threads() == 1


def test_same_result_as_the_plain_linear(one_thread):
    g = torch.Generator().manual_seed(0)
    lin = Linear(torch.randn(300, 64, generator=g))
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(WithThreads(lin, threads=2)(x), lin(x), rtol=1e-5, atol=1e-5)


def test_rejects_zero_threads():
    with pytest.raises(ValueError, match="threads"):
        WithThreads(lambda x: x, threads=0)


def test_build_engine_wraps_the_lm_head_only_when_asked(tiny_checkpoint, one_thread):
    assert isinstance(_engine(tiny_checkpoint).model.lm_head, Linear)
    wrapped = _engine(tiny_checkpoint, head_threads=2)
    assert isinstance(wrapped.model.lm_head, WithThreads) and wrapped.model.lm_head.threads == 2
    _generate(wrapped, (4, 5), max_tokens=1)     # the first step warms the kernels (through the wrapper too)
    assert wrapped.kernel_warm_up is not None and wrapped.kernel_warm_up.gemms > 0
    seen = []
    inner = wrapped.model.lm_head.fn
    wrapped.model.lm_head.fn = lambda x: (seen.append(torch.get_num_threads()), inner(x))[1]
    produced = _generate(wrapped, (1, 2, 3), max_tokens=2)
    assert seen == [2, 2] and produced == 2
    assert torch.get_num_threads() == 1


def test_step_threads_widen_from_the_threshold_on():
    policy = StepThreads(narrow=1, wide=2, wide_tokens=256)
    assert [policy(n) for n in (1, 64, 255, 256, 2048)] == [1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="wide_tokens"):
        StepThreads(narrow=1, wide=2, wide_tokens=0)


def test_prefill_steps_run_wide_and_decode_steps_narrow(tiny_checkpoint, one_thread):
    engine = _engine(tiny_checkpoint, head_threads=2, wide_step_tokens=8)
    seen = []                                  # torch threads in each MoE layer's expert call, per step
    dispatch = engine.dispatch
    engine.dispatch = lambda layer, *a: (seen.append((layer, torch.get_num_threads())), dispatch(layer, *a))[1]
    produced = _generate(engine, tuple(range(1, 11)), max_tokens=3)
    layers = sum(engine.model.config.moe_layers)
    threads_per_step = [t for layer, t in seen if layer == seen[0][0]]
    assert len(seen) == 3 * layers and threads_per_step == [2, 1, 1]   # the 10-token prefill, 2 decodes
    assert produced == 3
