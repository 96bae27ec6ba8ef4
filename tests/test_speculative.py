"""Speculative decoding with n-gram drafts (serving/engine/speculative.py): the proposer and the
greedy and sampled checks on their own (the sampled one's token frequencies against the
distribution), and the engine with drafts on giving exactly transformers' greedy tokens (beside
requests that may not be drafted for, with stop tokens inside accepted drafts, through chunked
prefill, preemption and the prefix cache), in fewer steps; sampled requests drafted for."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hf_reference import build_hf_checkpoint
from test_engine import _hf_greedy, _run
from serving.engine.engine import Engine
from serving.engine.request import FinishReason, GenerationRequest
from serving.engine.scheduler import SchedulerConfig
from serving.engine.speculative import SpeculativeConfig, accept_greedy, accept_sampled, draftable, propose
from serving.model.checkpoint import write_tokenizer
from serving.model.model import MoEModel
from serving.model.sampling import SamplingParams
from serving.model.tokenizer import Tokenizer
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement

VOCAB = 320         # greedy decoding of random weights soon repeats itself: drafts get accepted
SPEC = SpeculativeConfig(num_tokens=4, max_seqs=4)


def test_propose_takes_what_followed_the_latest_occurrence_of_the_longest_tail():
    cfg = SpeculativeConfig(num_tokens=3)
    assert propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3, cfg) == (7, 8, 1)   # latest of (1, 2, 3)
    assert propose([5, 6, 4, 4, 5, 6], 3, cfg) == (4, 4, 5)                        # (5, 6) when 3 do not recur
    assert propose([1, 2, 3, 4], 3, cfg) == ()                                     # no tail recurs
    assert propose([7, 7, 7], 3, cfg) == (7,)                                      # only what exists after it
    assert propose([1, 2, 9, 1, 2], 2, replace(cfg, lookback=3)) == ()            # outside the lookback


def test_accept_greedy_keeps_the_agreeing_prefix_and_one_more():
    logits = torch.full((4, 10), -1.0)
    for row, tok in enumerate([3, 5, 2, 8]):          # the argmax after each input position
        logits[row, tok] = 1.0
    assert accept_greedy((3, 5, 2), logits) == [3, 5, 2, 8]      # all agree: 3 drafts + 1
    assert accept_greedy((3, 6, 2), logits) == [3, 5]            # the second disagrees
    assert accept_greedy((4, 5, 2), logits) == [3]               # none: one token, as without drafts


def test_accept_sampled_gives_each_token_the_distribution_of_one_token_a_step():
    """20000 draws, seeded: the first token's frequencies are p_0 whatever the draft (the draft
    kept p_0(d) of the time, the residual otherwise), the second token (there only where the first
    draft was kept) is distributed as p_1, and after both drafts kept the bonus token as p_2."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.25, 0.25], [0.0, 0.9, 0.1, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    firsts, seconds, thirds = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    kept_both = 0
    for _ in range(n):
        out = accept_sampled((2, 0), p, g)
        assert 1 <= len(out) <= 3 and list(out[:len(out) - 1]) == [2, 0][:len(out) - 1]
        firsts[out[0]] += 1
        if out[0] == 2:                      # the first draft kept (or the residual drew 2: it cannot)
            seconds[out[1]] += 1
            if out[1] == 0:
                kept_both += 1
                thirds[out[2]] += 1
    assert torch.allclose(firsts / n, p[0], atol=0.015), firsts / n
    assert torch.allclose(seconds / seconds.sum(), p[1], atol=0.02), seconds / seconds.sum()
    assert torch.allclose(thirds / thirds.sum(), p[2], atol=0.03), thirds / thirds.sum()
    assert abs(kept_both / n - 0.3 * 0.5) < 0.015      # both drafts kept: p_0(2) p_1(0)
    # a draft the distribution rules out is never kept; one it is sure of always is
    assert all(accept_sampled((1,), torch.tensor([[0.5, 0.0, 0.5], [1.0, 0, 0]]), g)[0] != 1 for _ in range(200))
    assert accept_sampled((1, 1), torch.tensor([[0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]]), g) == [1, 1, 2]


def test_plain_greedy_and_unseeded_sampled_requests_are_drafted_for():
    assert draftable(SamplingParams(temperature=0.0))
    assert draftable(SamplingParams(temperature=0.7, top_k=20, top_p=0.9))
    assert draftable(SamplingParams(temperature=0.0, seed=3))          # greedy: the seed changes nothing
    for bad in (dict(temperature=0.7, seed=3), dict(temperature=0.0, repetition_penalty=1.1),
                dict(temperature=0.0, logit_bias=((3, 1.0),)), dict(temperature=0.0, min_tokens=2),
                dict(temperature=0.0, logprobs=True), dict(temperature=0.7, top_logprobs=2)):
        assert not draftable(SamplingParams(**bad)), bad


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, hf = build_hf_checkpoint(tmp_path_factory.mktemp("spec"), "mixtral", vocab_size=VOCAB,
                                   max_position_embeddings=256)
    write_tokenizer(path, VOCAB)
    return path, hf


def _engine(path, spec=SPEC, **sched) -> Engine:
    model = MoEModel.from_checkpoint(path)
    placement = Placement.build(model.config, 2, "round_robin")
    workers = [ExpertShardWorker.from_checkpoint(path, placement, s) for s in range(2)]
    dispatcher = ExpertDispatcher(placement, LocalTransport(workers), model.config.num_experts)
    sched = {"max_num_seqs": 4, "max_model_len": 128, "max_num_batched_tokens": 256, **sched}
    return Engine(model, dispatcher, Tokenizer.from_dir(path), SchedulerConfig(**sched), speculative=spec)


def _req(rid, ids, **sp):
    sp = {"temperature": 0.0, "ignore_eos": True, **sp}
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(ids), sampling=SamplingParams(**sp))


def test_drafted_tokens_are_transformers_greedy_in_fewer_steps(ckpt):
    path, hf = ckpt
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 19, 3)]
    on, off = _engine(path), _engine(path, spec=SpeculativeConfig())
    reqs = [_req(str(i), p, max_tokens=40) for i, p in enumerate(prompts)]
    reqs.append(_req("sampled", prompts[0], max_tokens=40, temperature=0.8, seed=1))   # never drafted for
    got, plain = _run(on, reqs, 2000), _run(off, reqs, 2000)
    for i, p in enumerate(prompts):
        assert [e.token_id for e in got[str(i)]] == _hf_greedy(hf, p, 40), f"prompt {i}"
        assert [e.completion_tokens for e in got[str(i)]] == list(range(1, 41))
        assert got[str(i)][-1].finish_reason is FinishReason.LENGTH
    assert [e.token_id for e in got["sampled"]] == [e.token_id for e in plain["sampled"]]
    s = on.stats
    assert s.spec_accepted_tokens_total > 0 and s.spec_draft_tokens_total >= s.spec_accepted_tokens_total
    assert off.stats.spec_draft_tokens_total == 0
    # the greedy ones alone (the sampled one takes its 40 steps whatever): the accepted drafts save steps
    on, off = _engine(path), _engine(path, spec=SpeculativeConfig())
    _run(on, reqs[:3], 2000), _run(off, reqs[:3], 2000)
    assert on.stats.steps_total < off.stats.steps_total == 40


def test_a_stop_inside_accepted_drafts_ends_the_stream_there(ckpt):
    """A prompt that already holds the pattern its greedy continuation repeats: the first decode
    step drafts that pattern, and a stop token (or max_tokens) inside the accepted drafts ends the
    stream there; the accepted tokens after it are not output."""
    path, hf = ckpt
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(3, VOCAB, (6,), generator=g).tolist()
    ref = _hf_greedy(hf, ids, 40)
    prompt, cont = ids + ref[:6], ref[6:]             # greedy is deterministic: the continuation of the longer prompt
    stop = cont[1]
    n = cont.index(stop) + 1
    engine = _engine(path)
    ev = _run(engine, [_req("s", prompt, max_tokens=30, stop_token_ids=(stop,))], 2000)["s"]
    assert [e.token_id for e in ev] == cont[:n] and ev[-1].finish_reason is FinishReason.STOP
    assert engine.stats.spec_accepted_tokens_total >= n - 1 > 0
    engine = _engine(path)
    short = _run(engine, [_req("m", prompt, max_tokens=3)], 2000)["m"]
    assert [e.token_id for e in short] == cont[:3] and short[-1].finish_reason is FinishReason.LENGTH
    assert engine.stats.steps_total == 2                  # prefill, then one step with the drafts


def test_drafts_with_chunked_prefill_preemption_and_the_prefix_cache(ckpt):
    """A 12-token step budget, a KV cache of 12 blocks of 8 that cannot hold all four sequences
    (preempted, recomputed), prefix caching on with the prompts run before: every stream is still
    transformers' greedy one, and the cache holds only computed K/V (a second round agrees)."""
    path, hf = ckpt
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (21, 9, 30, 4)]
    engine = _engine(path, max_num_batched_tokens=12, block_size=8, num_kv_blocks=12, max_model_len=96,
                     prefix_caching=True)
    for rnd in range(2):
        ev = _run(engine, [_req(f"{rnd}-{i}", p, max_tokens=30) for i, p in enumerate(prompts)], 5000)
        for i, p in enumerate(prompts):
            assert [e.token_id for e in ev[f"{rnd}-{i}"]] == _hf_greedy(hf, p, 30), (rnd, i)
    assert engine.stats.preempted_total > 0 and engine.stats.spec_accepted_tokens_total > 0
    assert engine.stats.prefix_hit_tokens_total > 0


def test_sampled_requests_are_drafted_for_and_top_k_1_gives_transformers_greedy(ckpt):
    """Sampled with top_k=1 the distribution is the argmax for certain: through the sampled check
    the tokens are exactly transformers' greedy ones, in fewer steps. Sampled at a low temperature
    (it repeats itself as greedy does) without a seed: drafted for too, drafts kept, every stream
    its max_tokens long."""
    path, hf = ckpt
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 19)]
    engine = _engine(path)
    got = _run(engine, [_req(str(i), p, max_tokens=40, temperature=1.0, top_k=1) for i, p in enumerate(prompts)],
               2000)
    for i, p in enumerate(prompts):
        assert [e.token_id for e in got[str(i)]] == _hf_greedy(hf, p, 40), f"prompt {i}"
    assert engine.stats.spec_accepted_tokens_total > 0 and engine.stats.steps_total < 40
    engine = _engine(path)
    got = _run(engine, [_req(str(i), p, max_tokens=40, temperature=0.1) for i, p in enumerate(prompts)], 2000)
    for i in range(len(prompts)):
        assert [e.completion_tokens for e in got[str(i)]] == list(range(1, 41))
        assert all(0 <= e.token_id < VOCAB for e in got[str(i)])
    assert engine.stats.spec_accepted_tokens_total > 0 and engine.stats.steps_total < 40
