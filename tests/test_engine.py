"""The engine in-process (no Ray): continuous batching must not change anyone's tokens."""
import asyncio

import pytest
import torch

from hf_reference import build_hf_checkpoint
from serving.engine.async_engine import AsyncEngine
from serving.engine.engine import Engine
from serving.engine.request import FinishReason, GenerationRequest
from serving.engine.scheduler import SchedulerConfig
from serving.model.checkpoint import write_tokenizer
from serving.model.config import MoEConfig
from serving.model.model import MoEModel
from serving.model.sampling import SamplingParams
from serving.model.tokenizer import Tokenizer
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, hf = build_hf_checkpoint(tmp_path_factory.mktemp("eng"), "qwen2_moe", vocab_size=VOCAB,
                                   num_experts=5, num_experts_per_tok=3, max_position_embeddings=256)
    write_tokenizer(path, VOCAB)
    return path, hf


def _engine(path, shards=2, max_num_seqs=8, **sched) -> Engine:
    model = MoEModel.from_checkpoint(path)
    placement = Placement.build(model.config, shards, "round_robin")
    workers = [ExpertShardWorker.from_checkpoint(path, placement, s) for s in range(shards)]
    dispatcher = ExpertDispatcher(placement, LocalTransport(workers), model.config.num_experts)
    sched = {"max_model_len": 256, "max_num_batched_tokens": 512, **sched}
    return Engine(model, dispatcher, Tokenizer.from_dir(path), SchedulerConfig(max_num_seqs=max_num_seqs, **sched))


def _hf_greedy(hf, ids, n):
    return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()


def _req(rid, ids, **sp):
    sp.setdefault("temperature", 0.0)
    sp.setdefault("ignore_eos", True)
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(ids), sampling=SamplingParams(**sp))


def _run(engine, reqs, max_steps=500):
    events = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.add_request(r, events[r.request_id].append)
    for _ in range(max_steps):
        if not engine.has_work():
            break
        engine.step()
    assert not engine.has_work()
    return events


def test_concurrent_requests_match_transformers_greedy(ckpt):
    path, hf = ckpt
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 1, 30, 9)]
    engine = _engine(path, shards=2)
    events = _run(engine, [_req(str(i), p, max_tokens=24) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        ours = [e.token_id for e in events[str(i)]]
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
        assert ours == ref, f"prompt {i}"
        assert events[str(i)][-1].finish_reason is FinishReason.LENGTH
        assert [e.completion_tokens for e in events[str(i)]] == list(range(1, 25))


def test_chunked_prefill_and_preemption_keep_every_token(ckpt):
    """A 10-token step budget splits prompts into chunks mixed with decodes, and a KV cache of
    10 blocks of 8 tokens cannot hold all five sequences: some are preempted and recomputed.
    Every request still streams exactly transformers' greedy tokens, each once."""
    path, hf = ckpt
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (23, 4, 31, 12, 7)]
    engine = _engine(path, shards=2, max_num_seqs=5, max_model_len=64, max_num_batched_tokens=10,
                     block_size=8, num_kv_blocks=10)
    assert engine.kv.num_blocks == 10
    events = _run(engine, [_req(str(i), p, max_tokens=20) for i, p in enumerate(prompts)], max_steps=2000)
    for i, p in enumerate(prompts):
        assert [e.token_id for e in events[str(i)]] == _hf_greedy(hf, p, 20), f"prompt {i}"
        assert [e.completion_tokens for e in events[str(i)]] == list(range(1, 21))
    assert engine.stats.preempted_total > 0
    assert engine.stats.kv_blocks_used == 0 and engine.stats.kv_blocks_total == 10


def test_late_joiners_do_not_change_running_tokens(ckpt):
    path, _ = ckpt
    alone = _run(_engine(path), [_req("a", [5, 6, 7, 8], max_tokens=16)])["a"]
    engine = _engine(path)
    got = {"a": [], "b": []}
    engine.add_request(_req("a", [5, 6, 7, 8], max_tokens=16), got["a"].append)
    for step in range(40):
        if step == 3:   # b joins a running batch at a step boundary
            engine.add_request(_req("b", list(range(10, 40)), max_tokens=8), got["b"].append)
        if not engine.has_work():
            break
        engine.step()
    assert [e.token_id for e in got["a"]] == [e.token_id for e in alone]
    assert len(got["b"]) == 8


def test_seeded_sampling_is_reproducible_across_batches(ckpt):
    path, _ = ckpt
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    one = _run(_engine(path), [_req("x", [9, 10, 11], **kw)])["x"]
    two = _run(_engine(path), [_req("y", [50, 51], **{**kw, "seed": 7}), _req("x", [9, 10, 11], **kw)])["x"]
    assert [e.token_id for e in one] == [e.token_id for e in two]


def test_stop_string_ends_the_request_and_is_not_returned(ckpt):
    path, _ = ckpt
    full = _run(_engine(path), [_req("a", [5, 6, 7], max_tokens=20)])["a"]
    text = "".join(e.text_delta for e in full)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"need visible text to pick a stop string from: {text!r}"
    cut = _run(_engine(path), [_req("a", [5, 6, 7], max_tokens=20, stop=(stop,))])["a"]
    out = "".join(e.text_delta for e in cut)
    assert cut[-1].finish_reason is FinishReason.STOP
    assert stop not in out and text.startswith(out) and len(cut) < len(full)


def test_eos_finishes_with_stop(ckpt):
    path, _ = ckpt
    engine = _engine(path)
    engine.eos_ids = frozenset(range(VOCAB))          # every token is an EOS for this test
    ev = _run(engine, [_req("a", [5, 6], max_tokens=10, ignore_eos=False)])["a"]
    assert len(ev) == 1 and ev[0].finish_reason is FinishReason.STOP


def test_bad_requests_are_refused_synchronously(ckpt):
    path, _ = ckpt
    engine = _engine(path)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request(_req("a", [1] * 250, max_tokens=10), lambda e: None)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(_req("b", [], max_tokens=10), lambda e: None)


def test_cancelled_stream_frees_its_slot_within_one_step(ckpt):
    path, _ = ckpt
    engine = _engine(path, max_num_seqs=2)
    async_engine = AsyncEngine(engine)

    async def main():
        stream = async_engine.stream(_req("c", [5, 6, 7], max_tokens=200))
        async for _ in stream:
            break
        for _ in range(100):                          # the gauges refresh at step boundaries
            if engine.stats.kv_slots_used == 1:
                break
            await asyncio.sleep(0.01)
        assert engine.stats.kv_slots_used == 1
        steps_before = engine.stats.steps_total
        await stream.aclose()                         # the client went away
        for _ in range(200):
            if engine.stats.kv_slots_used == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats.kv_slots_used == 0 and engine.stats.cancelled_total == 1
        assert engine.stats.steps_total - steps_before <= 1
        events = [e async for e in async_engine.stream(_req("d", [8, 9], max_tokens=5))]
        assert len(events) == 5 and events[-1].finish_reason is FinishReason.LENGTH

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=60))
    finally:
        async_engine.shutdown()


@pytest.mark.parametrize("hot", [(), (0,)])
def test_a_checkpoint_with_a_hot_expert_routes_most_tokens_to_it(tmp_path, hot):
    from serving.model.checkpoint import write_checkpoint
    path = write_checkpoint("mixtral", "tiny", tmp_path / "ckpt", hot_experts=hot, hot_gain=3.0)
    engine = _engine(path, shards=2)
    g = torch.Generator().manual_seed(1)
    _run(engine, [_req(f"r{i}", torch.randint(3, 1000, (32,), generator=g).tolist(), max_tokens=1)
                  for i in range(8)])                       # prefill only: 256 distinct tokens
    for layer, counts_SE in engine.dispatch.take_routed_counts().items():
        per_expert = torch.tensor(counts_SE).sum(0).float()
        share0 = float(per_expert[0] / per_expert.sum())   # top-2 of 4: uniform is 0.25, always-picked is 0.5
        assert (share0 > 0.45) if hot else (0.1 < share0 < 0.4), (layer, per_expert.tolist())


def test_a_resumed_request_goes_on_as_the_undisturbed_one(ckpt):
    """A stream broken after `cut` tokens and resumed (prompt + those tokens, resumed_tokens=cut,
    max_tokens what is left: serving/client.py continuation) gives the undisturbed stream's
    remaining tokens and text, seeded sampling with presence / frequency penalties included, and
    stops where it would have at a stop string spanning the break. Without resumed_tokens it
    would not (the penalties and the seeded draws would start over)."""
    path, _ = ckpt
    g = torch.Generator().manual_seed(21)
    prompt = torch.randint(3, VOCAB, (12,), generator=g).tolist()
    sp = dict(temperature=0.9, top_p=0.95, seed=5, presence_penalty=0.8, frequency_penalty=0.5)
    whole = _run(_engine(path), [_req("w", prompt, max_tokens=30, **sp)])["w"]
    ids = [e.token_id for e in whole]
    text = "".join(e.text_delta for e in whole)

    def resumed(cut: int, resumed_tokens: int, **extra) -> list:
        req = GenerationRequest(request_id="r", prompt_token_ids=tuple(prompt + ids[:cut]), resumed_tokens=resumed_tokens,
                                sampling=SamplingParams(max_tokens=30 - cut, ignore_eos=True, **sp, **extra))
        return _run(_engine(path), [req])["r"]

    for cut in (1, 9, 17):
        rest = resumed(cut, cut)
        assert [e.token_id for e in rest] == ids[cut:], cut
        assert "".join(e.text_delta for e in whole[:cut]) + "".join(e.text_delta for e in rest) == text, cut
        assert rest[-1].completion_tokens == 30 - cut
    assert [e.token_id for e in resumed(9, 0)] != ids[9:]             # the old way: not the same stream
    # a stop string whose first characters came before the break
    cut = next(c for c in range(4, 28) if len(sent := "".join(e.text_delta for e in whole[:c])) >= 2
               and len(text) >= len(sent) + 2 and text.find(text[len(sent) - 2:len(sent) + 2]) == len(sent) - 2)
    sent = "".join(e.text_delta for e in whole[:cut])
    stop = text[len(sent) - 2:len(sent) + 2]
    stopped = _run(_engine(path), [_req("s", prompt, max_tokens=30, stop=(stop,), **sp)])["s"]
    assert stopped[-1].finish_reason is FinishReason.STOP and len(stopped) > cut
    rest = resumed(cut, cut, stop=(stop,))
    assert [e.token_id for e in rest] == [e.token_id for e in stopped[cut:]]
    assert rest[-1].finish_reason is FinishReason.STOP
    assert sent + "".join(e.text_delta for e in rest) == "".join(e.text_delta for e in stopped)
