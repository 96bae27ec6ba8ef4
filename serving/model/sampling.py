"""Per-request sampling: greedy, or temperature -> top-k -> top-p (HF order and semantics) -> multinomial,
after logit_bias, the min_tokens mask, the repetition / frequency / presence penalties and the guided
decoding mask (serving/model/guided.py) where a request has them.

Shape legend: B rows (one per sequence), V vocab, S rows that sample (not greedy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from serving.model.guided import Guide, GuideMatcher, apply_guides


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0   # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0             # 0 => off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False
    repetition_penalty: float = 1.0    # 1 => off; over the prompt and the output
    presence_penalty: float = 0.0      # 0 => off; over the output
    frequency_penalty: float = 0.0     # 0 => off; over the output
    min_tokens: int = 0                # EOS / stop_token_ids masked until this many were generated
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0              # the k most likely tokens' logprobs at each position
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit), OpenAI's logit_bias
    guide: Guide | None = None         # structured output: the tokens must match it (guided.py)
    prompt_logprobs: int | None = None  # None => off; else each prompt token's logprob (given the ones
                                        # before it) and the k most likely tokens at its position

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.guide is not None and (self.ignore_eos or self.min_tokens):
            # the grammar allows end of sequence only where the output may end: masking it there
            # could leave nothing to sample
            raise ValueError("a guided request cannot set ignore_eos or min_tokens")

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def biased(self) -> bool:
        """Whether the logits are adjusted before sampling whatever was generated (bias or penalties)."""
        return bool(self.logit_bias) or self.penalized

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _argmax_chunk(vocab: int) -> int:
    """The largest power of two <= 256 (and >= 16) dividing `vocab`, or 0 (no chunked argmax)."""
    c = 256
    while c >= 16 and vocab % c:
        c //= 2
    return c if c >= 16 else 0


def _unique_first(keys: torch.Tensor, counts: bool = False):
    """The distinct values of `keys`, the position of one occurrence of each (to read per-key data
    from arrays aligned with `keys`), and with `counts` how often each occurs."""
    uniq, inverse, *cnt = torch.unique(keys, return_inverse=True, return_counts=counts)
    first = torch.empty(len(uniq), dtype=torch.int64).scatter_(0, inverse, torch.arange(len(keys)))
    return (uniq, first, *cnt)


def greedy_argmax(logits_BV: torch.Tensor) -> torch.Tensor:
    """argmax over V (the first maximum, NaN wins as in `max`) -> token_ids_B int64.

    On CPU, `max(dim=-1)` with indices is a scalar loop: 64 x 32k fp32 logits take ~1 ms, a step's
    third-largest cost after the expert GEMMs and the lm_head. Here the vocab is cut into chunks of
    c: the chunk maxima (`amax`, vectorised, ~0.06 ms), the first chunk holding the row maximum, then
    the first maximum inside that chunk: ~0.1 ms, the same index (first chunk with the maximum, first
    position in it)."""
    B, V = logits_BV.shape
    c = _argmax_chunk(V)
    if c == 0 or logits_BV.device.type != "cpu":
        return logits_BV.max(dim=-1).indices
    chunks_BNc = logits_BV.view(B, V // c, c)
    chunk_B = chunks_BNc.amax(dim=-1).max(dim=-1).indices                        # [B]
    inner_B = chunks_BNc[torch.arange(B, device=logits_BV.device), chunk_B].max(dim=-1).indices
    return chunk_B * c + inner_B


class History(NamedTuple):
    """A row's context: its token ids (prompt, then output so far) and how many are the prompt;
    `output_from`: where the output the presence / frequency penalties count starts, if earlier
    than the prompt's end (a resumed request: its prompt ends with its own earlier output). The
    sampler takes plain (ids, num_prompt[, output_from]) tuples too."""
    ids: Sequence[int]
    num_prompt: int
    output_from: int | None = None

    @property
    def output_start(self) -> int:
        return self.num_prompt if self.output_from is None else self.output_from


def position_seed(seed: int, position: int) -> int:
    """The seed of a seeded request's draw for output token `position` (0-based): each token's
    draw depends only on the request's seed and its position, so the stream is the same however
    it was scheduled, preempted or resumed."""
    return hash((seed, position)) & ((1 << 63) - 1)
# a row's most likely tokens: (token ids, their logprobs), most likely first
TopLogprobs = tuple[tuple[int, ...], tuple[float, ...]]


class SampleOutput(NamedTuple):
    token_ids_B: torch.Tensor            # int64
    logprobs_B: torch.Tensor             # fp32, NaN for rows that did not ask
    top: dict[int, TopLogprobs]          # row -> its top_logprobs, for rows that asked


class Sampler:
    def __init__(self, eos_ids: frozenset[int] | Sequence[int] = ()):
        self.eos_ids = tuple(sorted(eos_ids))     # masked by min_tokens (unless ignore_eos)

    def sample(self, logits_BV: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None], histories: Sequence[History] | None = None,
               guides: Sequence[GuideMatcher | None] | None = None) -> SampleOutput:
        """(token_ids_B int64, logprobs_B fp32 = log_softmax(raw logits) at the chosen token, and the
        top_logprobs of the rows whose params ask for them). Logprobs cost a pass over [B, V]; only rows
        whose params ask for them get one (others are NaN).
        `histories` (per row) is read only for rows with logit_bias, penalties or an unmet min_tokens,
        whose logits are adjusted first (`adjust_logits`); the logprobs stay those of the raw logits (vLLM's default).
        `guides` (per row, None where unguided): the tokens each guided row's grammar cannot take next
        are masked last."""
        logits_BV = raw_BV = logits_BV.float()
        adjust = [] if histories is None else [
            i for i, p in enumerate(params) if p.biased or (p.min_tokens and self._stop_mask(p, histories[i]))]
        guided = [] if guides is None else [i for i, g in enumerate(guides) if g is not None]
        if adjust or guided:
            with torch.inference_mode():             # the model's logits are inference tensors
                if (any(params[i].logprobs or params[i].top_logprobs for i in {*adjust, *guided})
                        or not logits_BV.is_contiguous()):
                    logits_BV = logits_BV.clone(memory_format=torch.contiguous_format)
                if adjust:
                    self.adjust_logits(logits_BV, adjust, params, histories)
                apply_guides(logits_BV, guided, [guides[i] for i in guided])
        token_ids_B = greedy_argmax(logits_BV)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits_BV.device)
            probs_SV = self.filtered_probs(logits_BV[rows], [params[i] for i in sampled])
            for j, i in enumerate(sampled):
                token_ids_B[i] = torch.multinomial(probs_SV[j], 1, generator=generators[i])[0]
        # log_softmax at the chosen token only, for the rows that want it: no [B, V] log-prob tensor
        logprobs_B = torch.full(token_ids_B.shape, float("nan"), device=logits_BV.device)
        top: dict[int, TopLogprobs] = {}
        want = [i for i, p in enumerate(params) if p.logprobs or p.top_logprobs]
        if want:
            rows = torch.tensor(want, device=logits_BV.device)
            lw_WV = raw_BV[rows]
            lse_W = torch.logsumexp(lw_WV, dim=-1)
            logprobs_B[rows] = lw_WV.gather(1, token_ids_B[rows, None])[:, 0] - lse_W
            k = max(params[i].top_logprobs for i in want)
            if k:
                top_vals, top_ids = lw_WV.topk(min(k, lw_WV.shape[-1]), dim=-1)    # most likely first
                vals, cand = (top_vals - lse_W[:, None]).tolist(), top_ids.tolist()
                for j, i in enumerate(want):
                    n = params[i].top_logprobs
                    if n:
                        top[i] = (tuple(cand[j][:n]), tuple(vals[j][:n]))
        return SampleOutput(token_ids_B, logprobs_B, top)

    def _stop_mask(self, p: SamplingParams, history: History) -> tuple[int, ...]:
        """The token ids this row may not sample yet: its stops while min_tokens is unmet."""
        ids, num_prompt = history[:2]
        if len(ids) - num_prompt >= p.min_tokens:
            return ()
        return p.stop_token_ids + (() if p.ignore_eos else self.eos_ids)

    def adjust_logits(self, logits_BV: torch.Tensor, rows: Sequence[int], params: Sequence[SamplingParams],
                      histories: Sequence[History]) -> None:
        """In place, for `rows`: logit_bias, the min_tokens mask (stops -> -inf), then the penalties as
        vLLM applies them: repetition over the prompt and the output (logit / p where > 0, * p where
        not), then frequency (x the count in the output) and presence (once if in the output)."""
        for i in rows:
            bias = params[i].logit_bias
            if bias:
                ids = torch.tensor([t for t, _ in bias], device=logits_BV.device)
                logits_BV[i, ids] += torch.tensor([b for _, b in bias], device=logits_BV.device)
            masked = self._stop_mask(params[i], histories[i])
            if masked:
                logits_BV[i, list(masked)] = float("-inf")
        pen = [i for i in rows if params[i].penalized]
        if not pen:
            return
        # sparse: only the (row, token) pairs a row's context holds are touched, as flat indices
        # row * V + token into the logits (a dense [rows, V] pass per penalty cost ~11 ms a step at 64 x 32k)
        dev, V = logits_BV.device, logits_BV.shape[-1]
        flat = logits_BV.view(-1)                       # logits_BV is contiguous (sample makes it so)
        seen, out, rep, freq, pres = [], [], [], [], []     # per row: its keys, and its penalties
        for i in pen:
            h = History(*histories[i])
            ids, n = h.ids, h.output_start
            p = params[i]
            keys = torch.as_tensor(ids, dtype=torch.int64) + i * V
            if p.repetition_penalty != 1.0:
                seen.append(keys)
                rep.append(p.repetition_penalty)
            if (p.frequency_penalty or p.presence_penalty) and len(ids) > n:
                out.append(keys[n:])
                freq.append(p.frequency_penalty)
                pres.append(p.presence_penalty)

        def per_key(values: list[float], rows: list[torch.Tensor]) -> torch.Tensor:
            return torch.tensor(values).repeat_interleave(torch.tensor([len(r) for r in rows]))

        if seen:      # repetition: every token of the prompt or the output, once
            keys, first = _unique_first(torch.cat(seen))
            keys, r = keys.to(dev), per_key(rep, seen)[first].to(dev)
            x = flat[keys]
            flat[keys] = torch.where(x > 0, x / r, x * r)
        if out:       # frequency (per occurrence in the output) and presence (once)
            keys, first, counts = _unique_first(torch.cat(out), counts=True)
            flat[keys.to(dev)] -= (per_key(freq, out)[first] * counts + per_key(pres, out)[first]).to(dev)

    @staticmethod
    def filtered_probs(logits_SV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """The distribution each row samples from [S, V]: softmax(logits / temperature) after top-k
        and top-p (rows with temperature > 0)."""
        dev, V = logits_SV.device, logits_SV.shape[-1]
        temp_S1 = torch.tensor([p.temperature for p in params], device=dev)[:, None]
        logits_SV = logits_SV / temp_S1
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            sorted_SV, order_SV = logits_SV.sort(dim=-1, descending=True)
            rank_V = torch.arange(V, device=dev)
            top_k_S1 = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=dev)[:, None]
            sorted_SV = sorted_SV.masked_fill(rank_V >= top_k_S1, float("-inf"))
            # top-p (HF): drop a token when the mass strictly before it (in descending order) is >= top_p;
            # the most likely token always stays.
            probs_SV = sorted_SV.softmax(dim=-1)
            mass_before_SV = probs_SV.cumsum(dim=-1) - probs_SV
            top_p_S1 = torch.tensor([p.top_p if p.top_p < 1 else 2.0 for p in params], device=dev)[:, None]  # 1 = off
            drop_SV = (mass_before_SV >= top_p_S1) & (rank_V > 0)
            sorted_SV = sorted_SV.masked_fill(drop_SV, float("-inf"))
            logits_SV = torch.full_like(logits_SV, float("-inf")).scatter(1, order_SV, sorted_SV)
        return logits_SV.softmax(dim=-1)
