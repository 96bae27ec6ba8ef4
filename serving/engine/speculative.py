"""Speculative decoding with n-gram (prompt lookup) drafts: the proposer and the checks. No model.

A decoding sequence whose last n tokens (n = max_ngram .. min_ngram) occurred earlier in its own
prompt or output is proposed the k tokens that followed that occurrence (vLLM's "ngram" /
prompt-lookup decoding; no draft model). The engine runs the sequence's last token and the k
drafts through the model in one step, as a chunk of k + 1 tokens, and keeps a prefix of the drafts
plus one more token, so a step yields 1 to k + 1 tokens: code, quotes, lists and repetitive text
repeat themselves.

- Greedy (`accept_greedy`): draft i is kept while it equals the argmax after the tokens before it;
  the argmax at the first mismatch (or after the last draft) is one more token. The output is
  exactly what one token a step would give (tests: against transformers' greedy).
- Sampled (`accept_sampled`, temperature > 0 with top-k / top-p): speculative sampling (Leviathan
  et al. 2023, Chen et al. 2023) with a draft that proposes one token for certain. Draft i is kept
  with probability p_i(d_i), p_i the request's distribution (temperature, top-k, top-p) after the
  tokens before it; the first one rejected is replaced by a sample of p_i without d_i (the
  residual max(0, p_i - onehot(d_i)), renormalized); after the last kept draft one more is sampled
  from p. Each token is distributed exactly as sampling one token a step (tests: the frequencies).
  Only requests without a seed: a seeded request's tokens are a function of its seed, whether the
  engine drafted for it or not (drafting depends on how many sequences run), so it is never drafted.

Only requests without anything else that reshapes the logits (penalties, logit_bias, min_tokens,
guided decoding) or asks for logprobs are drafted for, and only while at most `max_seqs`
sequences run: a step's cost grows with its rows once the batch is wide, while at a few sequences
a decode step streams the weights and the extra rows ride along.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from serving.model.sampling import SamplingParams, greedy_argmax


@dataclass(frozen=True, kw_only=True, slots=True)
class SpeculativeConfig:
    num_tokens: int = 0          # k drafts per sequence and step; 0 = off
    max_seqs: int = 4            # draft only while at most this many sequences run
    max_ngram: int = 3           # the longest tail looked up ...
    min_ngram: int = 2           # ... down to this length
    lookback: int = 1024         # tokens searched for it, most recent first

    def __post_init__(self):
        if self.num_tokens < 0 or self.max_seqs < 1:
            raise ValueError(f"speculative num_tokens must be >= 0 and max_seqs >= 1, got {self.num_tokens}, "
                             f"{self.max_seqs}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"speculative ngram sizes must satisfy 1 <= min_ngram <= max_ngram, got "
                             f"{self.min_ngram}, {self.max_ngram}")

    @property
    def enabled(self) -> bool:
        return self.num_tokens > 0


def draftable(sp: SamplingParams) -> bool:
    """Whether a request's next tokens can be checked against drafts: greedy, or sampled from the
    model's distribution (temperature, top-k, top-p) without a seed; nothing else reshaping the
    logits, no logprobs (module doc)."""
    plain = (not sp.biased and sp.guide is None and sp.min_tokens == 0 and not sp.logprobs
             and not sp.top_logprobs)
    return plain and (sp.greedy or sp.seed is None)


def propose(tokens: Sequence[int], k: int, cfg: SpeculativeConfig) -> tuple[int, ...]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (the longest n that occurs), or () if none occurs within the last `lookback` tokens."""
    L = len(tokens)
    lo = max(0, L - cfg.lookback)
    for n in range(cfg.max_ngram, cfg.min_ngram - 1, -1):
        if L - lo <= n:
            continue
        tail = list(tokens[L - n:])
        for start in range(L - n - 1, lo - 1, -1):          # most recent first; never the tail itself
            if tokens[start] == tail[0] and list(tokens[start:start + n]) == tail:
                return tuple(tokens[start + n:start + n + k])
    return ()


def accept_greedy(draft: Sequence[int], logits_QV: torch.Tensor) -> list[int]:
    """The tokens a greedy step over [last token, drafts] yields: the drafts the argmax agrees with,
    then the argmax at the first disagreement (or after the last draft). logits_QV: one row per
    input position, Q = len(draft) + 1."""
    target = greedy_argmax(logits_QV.contiguous()).tolist()       # the sampler's own greedy pick
    out = []
    for d, t in zip(draft, target):
        if d != t:
            break
        out.append(d)
    out.append(target[len(out)])
    return out


def accept_sampled(draft: Sequence[int], probs_QV: torch.Tensor,
                   generator: torch.Generator | None = None) -> list[int]:
    """The tokens a sampled step over [last token, drafts] yields (module doc): draft i kept with
    probability p_i(d_i); the first rejected one replaced by a sample of the residual; after the
    last kept one, a sample of p. probs_QV: the request's distribution after each input position,
    Q = len(draft) + 1 (Sampler.filtered_probs)."""
    u = torch.rand(len(draft), generator=generator).tolist()
    out = []
    for i, d in enumerate(draft):
        p_V = probs_QV[i]
        if u[i] < float(p_V[d]):
            out.append(d)
            continue
        residual_V = p_V.clone()
        residual_V[d] = 0.0                 # max(0, p - onehot(d)): p elsewhere, 0 at d (p(d) < 1 here)
        out.append(int(torch.multinomial(residual_V, 1, generator=generator)[0]))
        return out
    out.append(int(torch.multinomial(probs_QV[len(draft)], 1, generator=generator)[0]))
    return out
