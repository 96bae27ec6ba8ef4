"""Repetition / presence / frequency penalties, min_tokens and stop_token_ids: the sampler's math
against transformers' logits processors and OpenAI's formula, and the engine's tokens against
transformers' `generate` with the same settings."""
from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from hf_reference import build_hf_checkpoint
from test_engine import _engine, _run
from serving.engine.request import FinishReason, GenerationRequest
from serving.model.checkpoint import write_tokenizer
from serving.model.sampling import Sampler, SamplingParams

V = 40
EOS = 2


def _logits(B: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


# ---- the sampler's math ----------------------------------------------------------------------

def test_repetition_penalty_is_transformers_over_prompt_and_output():
    logits = _logits(3)
    histories = [([5, 6, 6, 7, 9, 9, 9], 4), ([1, 2, 3], 3), ([11, 30, 4, 4], 1)]
    params = [SamplingParams(temperature=0, repetition_penalty=p) for p in (1.3, 1.0, 0.7)]
    adjusted = logits.clone()
    Sampler().adjust_logits(adjusted, [0, 1, 2], params, histories)
    for i, ((ids, _), p) in enumerate(zip(histories, params)):
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([ids]), logits[i:i + 1].clone())
        torch.testing.assert_close(adjusted[i], ref[0])
    assert not torch.equal(adjusted[0], logits[0]) and torch.equal(adjusted[1], logits[1])


def test_presence_and_frequency_penalties_are_openais_over_the_output_only():
    logits = _logits(2, seed=1)
    histories = [([8, 8, 3, 3, 3, 12], 2), ([8, 20], 2)]       # row 0: prompt 8 8, output 3 3 3 12; row 1: none yet
    params = [SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=-0.25),
              SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=1.0)]
    adjusted = logits.clone()
    Sampler().adjust_logits(adjusted, [0, 1], params, histories)
    expected = logits.clone()
    for j in range(V):        # mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence (OpenAI)
        c = [3, 3, 3, 12].count(j)
        expected[0, j] -= c * -0.25 + (c > 0) * 0.5
    torch.testing.assert_close(adjusted, expected)         # the prompt's 8 and row 1 (no output): untouched


def test_penalties_change_the_choice_but_not_the_reported_logprob():
    logits = torch.full((2, V), -1.0)
    logits[:, 7], logits[:, 9] = 2.0, 1.9
    params = [SamplingParams(temperature=0, logprobs=True, repetition_penalty=1.5), SamplingParams(temperature=0, logprobs=True)]
    ids, logprobs, _ = Sampler().sample(logits.clone(), params, [None, None], [([7, 7], 1), ([7, 7], 1)])
    assert ids.tolist() == [9, 7]                       # 2.0 / 1.5 < 1.9: the repeat loses ...
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(logprobs, torch.stack([raw[0, 9], raw[1, 7]]))   # ... logprobs are the raw model's


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(4, V)
    logits[:, EOS], logits[:, 13], logits[:, 20] = 5.0, 4.0, 3.0
    p = SamplingParams(temperature=0, max_tokens=8, min_tokens=2, stop_token_ids=(13,))
    no_eos = SamplingParams(temperature=0, max_tokens=8, min_tokens=2, stop_token_ids=(13,), ignore_eos=True)
    histories = [([1, 30], 1), ([1, 30, 31], 1), ([1], 1), ([1], 1)]   # 1, 2, 0 and 0 tokens generated
    ids, *_ = Sampler(eos_ids=(EOS,)).sample(logits, [p, p, p, no_eos], [None] * 4, histories)
    assert ids.tolist() == [20, EOS, 20, EOS]   # masked below 2 generated; ignore_eos leaves EOS (it cannot stop)


def test_logit_bias_is_added_before_the_choice_and_not_to_the_logprobs():
    logits = _logits(2, seed=3)
    best = int(logits[0].argmax())
    params = [SamplingParams(temperature=0, logprobs=True, logit_bias=((best, -100.0), (7, 0.5))),
              SamplingParams(temperature=0, logprobs=True)]
    adjusted = logits.clone()
    Sampler().adjust_logits(adjusted, [0], params, [([1], 1), ([1], 1)])
    expected = logits.clone()
    expected[0, best] -= 100.0
    expected[0, 7] += 0.5
    torch.testing.assert_close(adjusted, expected)
    ids, logprobs, _ = Sampler().sample(logits.clone(), params, [None, None], [([1], 1), ([1], 1)])
    assert ids.tolist() == [int(expected[0].argmax()), int(logits[1].argmax())] and ids[0] != best
    torch.testing.assert_close(logprobs[0], torch.log_softmax(logits[0], -1)[ids[0]])


@pytest.mark.parametrize("bad", [dict(repetition_penalty=0.0), dict(min_tokens=-1), dict(min_tokens=9)])
def test_sampling_params_refuse_out_of_range(bad):
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=8, **bad)


# ---- the engine against transformers' generate ----------------------------------------------

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, hf = build_hf_checkpoint(tmp_path_factory.mktemp("pen"), "mixtral", vocab_size=VOCAB,
                                   max_position_embeddings=256)
    write_tokenizer(path, VOCAB)
    return path, hf


def _hf(hf, ids, n, **kw) -> list[int]:
    kw.setdefault("eos_token_id", None)
    return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kw)[0, len(ids):].tolist()


def test_engine_matches_transformers_generate_with_penalties_and_stops(ckpt):
    path, hf = ckpt
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 19, 11)]
    plain = [_hf(hf, p, 20) for p in prompts]
    # stop ids: a token each plain continuation reaches at its 4th step (not earlier)
    stops = [next(t for k, t in enumerate(c) if k >= 3 and t not in c[:k]) for c in plain]
    cases = {
        "rep": (dict(repetition_penalty=1.6), dict(repetition_penalty=1.6)),
        "rep-low": (dict(repetition_penalty=0.8), dict(repetition_penalty=0.8)),
        "stop": (dict(stop_token_ids=None), dict(eos_token_id=None)),      # filled per prompt below
        "min": (dict(stop_token_ids=None, min_tokens=6), dict(eos_token_id=None, min_new_tokens=6)),
        "bias": (dict(logit_bias=None, repetition_penalty=1.2), dict(sequence_bias=None, repetition_penalty=1.2)),
    }
    reqs, expected = [], {}
    for name, (ours, theirs) in cases.items():
        for i, p in enumerate(prompts):
            o, t = dict(ours), dict(theirs)
            if "stop_token_ids" in o:
                o["stop_token_ids"], t["eos_token_id"] = (stops[i], plain[i][0]), [stops[i], plain[i][0]]
            if "logit_bias" in o:      # ban the plain answer's first token, favour its fourth a little
                o["logit_bias"] = ((plain[i][0], -100.0), (stops[i], 2.5))
                t["sequence_bias"] = {(plain[i][0],): -100.0, (stops[i],): 2.5}
            rid = f"{name}-{i}"
            reqs.append(GenerationRequest(request_id=rid, prompt_token_ids=tuple(p), sampling=SamplingParams(
                max_tokens=20, temperature=0.0, ignore_eos=True, **o)))
            expected[rid] = _hf(hf, p, 20, **t)
    events = _run(_engine(path), reqs)        # all in one batch: rows with and without each setting
    for rid, evs in events.items():
        got = [e.token_id for e in evs]
        assert got == expected[rid], rid
        if rid.startswith(("stop", "min")):     # STOP exactly when it ended on a stop id, else max_tokens
            i = int(rid[-1])
            ended = got[-1] in (stops[i], plain[i][0])
            assert evs[-1].finish_reason == (FinishReason.STOP if ended else FinishReason.LENGTH), rid
            assert ended or len(got) == 20
    # the stop cases really stopped early, and min_tokens really held off a stop id the plain run would take first
    assert all(len(events[f"stop-{i}"]) == 1 for i in range(3))     # the plain run's first token is a stop id
    assert all(len(events[f"min-{i}"]) > 6 for i in range(3))
    assert any(events[f"rep-{i}"][k].token_id != plain[i][k] for i in range(3) for k in range(20))
    assert all(plain[i][0] not in [e.token_id for e in events[f"bias-{i}"]] for i in range(3))


def test_stop_strings_wait_for_min_tokens(ckpt):
    path, _ = ckpt
    prompt = (5, 9, 30, 41, 7)
    engine = _engine(path)
    free = _run(engine, [GenerationRequest(request_id="free", prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True))])["free"]
    text = "".join(e.text_delta for e in free)
    first = free[0].text_delta
    assert first, "the tokenizer gives the first token text"
    held = _run(engine, [GenerationRequest(request_id="held", prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, stop=(first,), min_tokens=4))])["held"]
    stopped = _run(engine, [GenerationRequest(request_id="stop", prompt_token_ids=prompt, sampling=SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, stop=(first,)))])["stop"]
    assert len(stopped) == 1 and stopped[0].finish_reason == FinishReason.STOP
    assert len(held) >= 4 and [e.token_id for e in held[:4]] == [e.token_id for e in free[:4]]
    assert text.startswith("".join(e.text_delta for e in held))


def test_engine_top_logprobs_are_transformers_log_softmax(ckpt):
    path, hf = ckpt
    prompt = [7, 19, 4, 250, 66]
    evs = _run(_engine(path), [GenerationRequest(request_id="top", prompt_token_ids=tuple(prompt), sampling=SamplingParams(
        max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=4, repetition_penalty=1.3))])["top"]
    tokens = [e.token_id for e in evs]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float(), dim=-1)
    for pos, e in enumerate(evs):
        ids, lps = e.top_logprobs
        vals, expected = ref[pos].topk(4)
        assert list(ids) == expected.tolist(), pos           # of the raw logits, not the penalized ones
        torch.testing.assert_close(torch.tensor(lps), vals, rtol=1e-4, atol=1e-4)
        assert e.logprob == pytest.approx(float(ref[pos, e.token_id]), abs=1e-4)
