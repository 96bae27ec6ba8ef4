"""prompt_logprobs: each prompt token's logprob given the tokens before it (vLLM's prompt_logprobs,
what evaluation harnesses score with), against transformers' log_softmax of one full forward:
in one step, split over prefill chunks, recomputed after preemption, and with the prompt's blocks
already in the prefix cache (which must not skip the positions whose logits are wanted)."""
from __future__ import annotations

import pytest
import torch

from hf_reference import build_hf_checkpoint, hf_logits
from test_engine import _engine, _run
from serving.engine.request import GenerationRequest
from serving.model.checkpoint import write_tokenizer
from serving.model.sampling import SamplingParams

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, hf = build_hf_checkpoint(tmp_path_factory.mktemp("plp"), "mixtral", vocab_size=VOCAB,
                                   max_position_embeddings=256)
    write_tokenizer(path, VOCAB)
    return path, hf


def _req(rid, ids, k=None, max_tokens=4):
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(ids), sampling=SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=k))


def _reference(hf, ids, k):
    logprobs_TV = hf_logits(hf, ids).log_softmax(-1)                  # row t: the token after t
    chosen = [float(logprobs_TV[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    top = [logprobs_TV[t].topk(k) for t in range(len(ids) - 1)] if k else []
    return chosen, top


def _check(events, hf, ids, k):
    first = events[0]
    assert all(e.prompt_logprobs is None for e in events[1:])         # once, with the first token
    chosen, top = _reference(hf, ids, k)
    assert len(first.prompt_logprobs) == len(ids) - 1
    assert torch.allclose(torch.tensor(first.prompt_logprobs), torch.tensor(chosen), atol=1e-4)
    if k:
        assert len(first.prompt_top_logprobs) == len(ids) - 1
        for (ids_k, lps_k), ref in zip(first.prompt_top_logprobs, top):
            assert list(ids_k) == ref.indices.tolist()
            assert torch.allclose(torch.tensor(lps_k), ref.values, atol=1e-4)
    else:
        assert first.prompt_top_logprobs is None


def test_prompt_logprobs_match_transformers_beside_requests_without_them(ckpt):
    path, hf = ckpt
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 23, 1, 40)]
    engine = _engine(path)
    reqs = [_req("a", prompts[0], k=3), _req("b", prompts[1], k=0), _req("c", prompts[2], k=2),
            _req("d", prompts[3])]
    events = _run(engine, reqs)
    _check(events["a"], hf, prompts[0], 3)
    _check(events["b"], hf, prompts[1], 0)
    assert events["c"][0].prompt_logprobs == ()                       # one token: nothing before it
    assert all(e.prompt_logprobs is None for e in events["d"])        # not asked
    # the generated tokens are unchanged by the extra rows
    alone = _run(_engine(path), [_req("d", prompts[3])])["d"]
    assert [e.token_id for e in events["d"]] == [e.token_id for e in alone]
    assert [e.token_id for e in events["a"]] == [e.token_id for e in _run(_engine(path), [_req("a", prompts[0])])["a"]]


def test_prompt_logprobs_over_chunks_preemption_and_a_warm_prefix_cache(ckpt):
    """A 10-token step budget splits the prompts into chunks; a KV cache of 10 blocks of 8 cannot
    hold them all (preemption recomputes some); prefix caching is on and the same prompts ran
    before, so their blocks are cached: every prompt position must still be computed once."""
    path, hf = ckpt
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (33, 17, 26)]
    engine = _engine(path, max_num_batched_tokens=10, block_size=8, num_kv_blocks=10, max_num_seqs=3,
                     max_model_len=64, prefix_caching=True)
    _run(engine, [_req(f"warm{i}", p) for i, p in enumerate(prompts)], 3000)   # their blocks join the cache
    preempted = engine.stats.preempted_total
    events = _run(engine, [_req(str(i), p, k=2, max_tokens=12) for i, p in enumerate(prompts)], 3000)
    assert engine.stats.preempted_total > preempted
    for i, p in enumerate(prompts):
        _check(events[str(i)], hf, p, 2)
        assert events[str(i)][0].cached_tokens == 0                    # the cache was not used for them
    again = _run(engine, [_req("again", prompts[0])])["again"]
    assert again[0].cached_tokens > 0                                  # but it still serves the others


def test_prompt_logprobs_are_computed_a_few_rows_at_a_time(ckpt, monkeypatch):
    """The logprobs of a step's prompt rows are taken PROMPT_LOGPROB_ROWS at a time (no second
    [rows, vocab] tensor): with 7 at a time, prompts of 40 and 23 tokens in one step still match."""
    import serving.engine.engine as engine_module
    monkeypatch.setattr(engine_module, "PROMPT_LOGPROB_ROWS", 7)
    path, hf = ckpt
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (40, 23)]
    events = _run(_engine(path), [_req("a", prompts[0], k=2), _req("b", prompts[1], k=0)])
    _check(events["a"], hf, prompts[0], 2)
    _check(events["b"], hf, prompts[1], 0)
