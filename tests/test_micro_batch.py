"""Ping-pong micro-batches (serving/engine/micro_batch.py): same logits and tokens as one
forward over the whole batch, with the experts' calls of one half in flight while the other
half runs. No Ray: a transport that runs the shards on a thread stands in for remote shards."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from serving.engine.engine import Engine
from serving.engine.micro_batch import forward_ping_pong, split_in_two
from serving.engine.request import GenerationRequest
from serving.engine.scheduler import SchedulerConfig
from serving.model.checkpoint import write_checkpoint
from serving.model.kv_cache import KVCache
from serving.model.model import BatchLayout, MoEModel
from serving.model.sampling import SamplingParams
from serving.model.tokenizer import Tokenizer
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement


class ThreadedTransport(LocalTransport):
    """Shards on a worker thread: `submit` returns at once, like the serve/collective transports.
    It records how many submits were in flight at once."""
    name = "threaded"

    def __init__(self, workers):
        super().__init__(workers)
        self.pool = ThreadPoolExecutor(1)
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def submit(self, layer, calls):
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        future = self.pool.submit(self.run, layer, calls)
        transport = self

        class Pending:
            def wait(self):
                out = future.result()
                with transport._lock:
                    transport.in_flight -= 1
                return out
        return Pending()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("mixtral", "tiny", tmp_path_factory.mktemp("ckpt"))


def _dispatcher(path, model, threaded: bool):
    placement = Placement.build(model.config, 2, "contiguous")
    workers = [ExpertShardWorker.from_checkpoint(path, placement, s) for s in range(2)]
    transport = ThreadedTransport(workers) if threaded else LocalTransport(workers)
    return ExpertDispatcher(placement, transport, model.config.num_experts)


def test_split_in_two_balances_tokens_and_leaves_neither_half_empty():
    def lay(q):
        return BatchLayout(tuple(range(len(q))), (0,) * len(q), tuple(q))
    assert split_in_two(lay([1, 1, 1, 1])) == 2
    assert split_in_two(lay([30, 1, 1, 1])) == 1
    assert split_in_two(lay([1, 1, 1, 30])) == 3
    assert split_in_two(lay([5, 5])) == 1


def test_ping_pong_logits_equal_one_forward_and_two_layers_are_in_flight(ckpt):
    model = MoEModel.from_checkpoint(ckpt)
    plain, threaded = _dispatcher(ckpt, model, False), _dispatcher(ckpt, model, True)
    assert threaded.overlaps and not plain.overlaps
    g = torch.Generator().manual_seed(0)
    q_lens = (7, 1, 1, 5, 1)                  # prefill chunks and decodes mixed
    start = (0, 9, 4, 0, 12)
    batch = BatchLayout(slots=(0, 1, 2, 3, 4), start_pos=start, q_lens=q_lens)
    ids_T = torch.randint(3, 1000, (sum(q_lens),), generator=g)
    logits = []
    for run in (lambda kv: model.forward(ids_T, batch, kv, plain),
                lambda kv: forward_ping_pong(model, ids_T, batch, kv, threaded)):
        kv = KVCache(model.config, 5, 64, torch.float32, "cpu")
        torch.manual_seed(1)                  # same cached history for both runs
        for k, v in zip(kv.k, kv.v):
            k.normal_(), v.normal_()
        logits.append(run(kv))
    assert logits[0].shape == logits[1].shape == (5, model.config.vocab_size)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    assert threaded.transport.max_in_flight == 2          # A's experts were out while B ran


def test_engine_with_ping_pong_generates_the_same_tokens(ckpt):
    def run(threaded: bool) -> dict[str, list[int]]:
        model = MoEModel.from_checkpoint(ckpt)
        engine = Engine(model, _dispatcher(ckpt, model, threaded), Tokenizer.from_dir(ckpt),
                        SchedulerConfig(max_num_seqs=6, max_model_len=128, max_num_batched_tokens=24),
                        ping_pong=True)
        assert engine.ping_pong is threaded
        out: dict[str, list[int]] = {}
        g = torch.Generator().manual_seed(2)
        for i in range(6):
            rid = f"r{i}"
            out[rid] = []
            ids = tuple(torch.randint(3, 1000, (4 + 5 * i,), generator=g).tolist())
            engine.add_request(GenerationRequest(request_id=rid, prompt_token_ids=ids,
                                                 sampling=SamplingParams(max_tokens=12, temperature=0,
                                                                         ignore_eos=True)),
                               lambda ev, rid=rid: out[rid].append(ev.token_id))
        for _ in range(200):
            if not engine.has_work():
                break
            engine.step()
        assert not engine.has_work()
        return out
    assert run(True) == run(False)


def test_a_failing_half_still_completes_the_other_halfs_calls(ckpt):
    class FailOnThirdWait(ThreadedTransport):
        waits = 0

        def submit(self, layer, calls):
            inner = super().submit(layer, calls)
            transport = self

            class Pending:
                def wait(self):
                    out = inner.wait()
                    transport.waits += 1
                    if transport.waits == 3:
                        raise RuntimeError("shard fault")
                    return out
            return Pending()

    model = MoEModel.from_checkpoint(ckpt)
    placement = Placement.build(model.config, 2, "contiguous")
    transport = FailOnThirdWait([ExpertShardWorker.from_checkpoint(ckpt, placement, s) for s in range(2)])
    dispatcher = ExpertDispatcher(placement, transport, model.config.num_experts)
    batch = BatchLayout(slots=(0, 1), start_pos=(0, 0), q_lens=(3, 3))
    with pytest.raises(RuntimeError, match="shard fault"):
        forward_ping_pong(model, torch.arange(3, 9), batch, KVCache(model.config, 2, 32, torch.float32, "cpu"),
                          dispatcher)
    assert transport.in_flight == 0 and transport.waits == 4     # the other half's call was waited for
