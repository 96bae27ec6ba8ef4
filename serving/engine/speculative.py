"""Speculative decoding with n-gram (prompt lookup) drafts: the proposer and the greedy check. No model.

A decoding sequence whose last n tokens (n = max_ngram .. min_ngram) occurred earlier in its own
prompt or output is proposed the k tokens that followed that occurrence (vLLM's "ngram" /
prompt-lookup decoding; no draft model). The engine runs the sequence's last token and the k
drafts through the model in one step, as a chunk of k + 1 tokens, and keeps the drafts the model
itself would have produced: greedy, draft i is accepted while it equals the argmax after the
tokens before it, and the argmax at the first mismatch (or after the last draft) is one more
token. The output is exactly what one token a step would give (tests: against transformers'
greedy), in up to k + 1 tokens a step: code, quotes, lists and repetitive text repeat themselves.

Only greedy requests without anything that reshapes the logits (penalties, logit_bias, min_tokens,
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
    """Whether a request's next tokens are the plain argmax of the model's logits (nothing else to
    reproduce in the check)."""
    return (sp.temperature == 0 and not sp.biased and sp.guide is None and sp.min_tokens == 0
            and not sp.logprobs and not sp.top_logprobs)


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
