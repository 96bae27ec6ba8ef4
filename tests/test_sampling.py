"""Sampler semantics: greedy, seeded reproducibility, temperature / top-k / top-p as in transformers."""
from __future__ import annotations

import pytest
import torch

from serving.model.sampling import Sampler, SamplingParams

V = 50


def _logits(B: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _gens(seed: int, B: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(B)]


def test_greedy_is_argmax_with_logprob():
    logits = _logits(6)
    ids, logprobs, _ = Sampler().sample(logits, [SamplingParams(temperature=0, logprobs=True)] * 6, [None] * 6)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(ids, logits.argmax(-1))
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).max(-1).values)


def test_seeded_sampling_is_reproducible():
    logits, params = _logits(8), [SamplingParams(temperature=1.0, seed=7)] * 8
    runs = [torch.stack([Sampler().sample(logits, params, _gens(7, 8))[0] for _ in range(5)]) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert len(set(runs[0].flatten().tolist())) > 3   # it really samples
    other = torch.stack([Sampler().sample(logits, params, _gens(1000, 8))[0] for _ in range(5)])
    assert not torch.equal(runs[0], other)


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = _logits(16, seed=3)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8 + [SamplingParams(temperature=1.5, top_p=1e-6)] * 8
    ids, *_ = Sampler().sample(logits, params, _gens(0, 16))
    assert torch.equal(ids, logits.argmax(-1))


def test_mixed_batch_greedy_and_sampled_rows():
    logits = _logits(4, seed=5)
    params = [SamplingParams(temperature=0, logprobs=True), SamplingParams(temperature=1.0, top_k=3, logprobs=True),
              SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.5, logprobs=True)]
    ids, logprobs, _ = Sampler().sample(logits, params, [None, *_gens(0, 1), None, *_gens(1, 1)])
    assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()
    assert ids[1] in logits[1].topk(3).indices
    want = torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(logprobs[[0, 1, 3]], want[[0, 1, 3]])
    assert torch.isnan(logprobs[2])         # row 2 did not ask for logprobs: no [V] pass for it


def test_temperature_matches_softmax_frequencies():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    N, g = 20000, torch.Generator().manual_seed(0)
    for temperature in (0.5, 2.0):
        ids, *_ = Sampler().sample(logits.expand(N, 4), [SamplingParams(temperature=temperature)] * N, [g] * N)
        freq = torch.bincount(ids, minlength=4).float() / N
        torch.testing.assert_close(freq, torch.softmax(logits[0] / temperature, -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.5), (1.0, 0, 0.3)])
def test_filtered_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                         TopPLogitsWarper)
    logits = _logits(6, seed=11)
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = Sampler.filtered_probs(logits, [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * 6)
    torch.testing.assert_close(ours, ref.softmax(-1), atol=1e-6, rtol=0)


def test_sampled_tokens_stay_inside_top_k():
    logits = _logits(1, seed=2)
    N = 2000
    ids, *_ = Sampler().sample(logits.expand(N, V), [SamplingParams(top_k=4)] * N, [torch.Generator()] * N)
    assert set(ids.tolist()) <= set(logits[0].topk(4).indices.tolist())


def test_invalid_params_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("vocab", [32000, 151936, 50257, 48])
def test_greedy_argmax_is_the_first_maximum(vocab):
    """The chunked argmax returns torch's argmax, ties (first one wins, also across chunks) included."""
    from serving.model.sampling import greedy_argmax
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=g)
    top = logits.max() + 1
    logits[1, [vocab - 1]] = top                     # the last position
    logits[2, [5, vocab // 2]] = top                 # a tie across chunks: the first wins
    logits[3, [0, 1]] = top                          # a tie inside the first chunk
    logits[4] = 0.0                                  # all equal: index 0
    logits[5, vocab // 3] = float("nan")             # NaN wins, as in torch.max
    ids = greedy_argmax(logits)
    assert ids.dtype == torch.int64
    assert torch.equal(ids, logits.max(dim=-1).indices)
    assert ids[1] == vocab - 1 and ids[2] == 5 and ids[3] == 0 and ids[4] == 0 and ids[5] == vocab // 3


def test_top_logprobs_are_the_most_likely_tokens_of_the_raw_logits():
    logits = _logits(4, seed=5)
    params = [SamplingParams(temperature=0, logprobs=True, top_logprobs=3), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_logprobs=5, seed=1), SamplingParams(temperature=0, logprobs=True)]
    ids, logprobs, top = Sampler().sample(logits, params, [None, None, torch.Generator().manual_seed(1), None])
    assert sorted(top) == [0, 2]                                 # only the rows that asked
    ref = torch.log_softmax(logits, dim=-1)
    for row, k in ((0, 3), (2, 5)):
        top_ids, top_lps = top[row]
        vals, expected = ref[row].topk(k)
        assert list(top_ids) == expected.tolist() and len(top_lps) == k
        torch.testing.assert_close(torch.tensor(top_lps), vals)
    assert top[0][0][0] == ids[0] and top[0][1][0] == pytest.approx(float(logprobs[0]))   # greedy: the top-1
