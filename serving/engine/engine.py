"""The engine: one step is schedule() -> execute() -> update(), on one screen.

A plain object (no Ray): the EngineReplica deployment wraps it, tests drive it directly.
`add_request` and `abort` are thread-safe; `step` runs on one thread (see AsyncEngine).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from serving.engine.micro_batch import forward_ping_pong
from serving.engine.request import FinishReason, GenerationRequest, TokenEvent
from serving.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, Sequence
from serving.engine.speculative import SpeculativeConfig, accept_greedy, accept_sampled, draftable, propose
from serving.engine.step_phases import PHASES, TimedDispatch, step_phases
from serving.model.guided import GuideCompiler, GuideMatcher, GuidedDecodingUnavailable
from serving.model.kv_cache import KVCache
from serving.model.linear import WarmTarget, WarmUpReport, warm_up
from serving.model.model import BatchLayout, ExpertDispatch, MoEModel
from serving.model.sampling import Sampler, TopLogprobs, position_seed
from serving.model.tokenizer import IncrementalDetokenizer, Tokenizer

Emit = Callable[[TokenEvent], None]
log = logging.getLogger(__name__)
PROMPT_LOGPROB_ROWS = 256     # prompt_logprobs: rows of a step's logits turned into logprobs at a time


@dataclass(slots=True)
class _RequestState:
    emit: Emit
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    guide: GuideMatcher | None = None   # guided decoding: the grammar's state over this output
    prompt_logprobs: list[float] = field(default_factory=list)      # prompt tokens 1.. so far
    prompt_top: list[TopLogprobs] = field(default_factory=list)
    text: str = ""              # detokenized output so far
    text_sent: int = 0          # characters of `text` already streamed


@dataclass(frozen=True, slots=True)
class PromptRows:
    """A sequence of the step whose prompt positions lo..hi-1 need their logits (prompt_logprobs):
    rows `first`.. of the step's extra logits, each the distribution of the prompt token after it."""
    seq: Sequence
    lo: int
    hi: int
    first: int


@dataclass(frozen=True, slots=True)
class DraftRows:
    """A sequence of the step run with draft tokens (speculative.py): its q - 1 rows before its last
    are rows `first`.. of the step's extra logits (the last is its row among the B)."""
    index: int               # its position in the step's batch
    first: int


def step_rows(out: SchedulerOutput) -> tuple[list[int], list[PromptRows], list[DraftRows]]:
    """Token rows of the step whose logits it needs: each sequence's last new token (sampling),
    then the prompt positions prompt_logprobs still wants (their hidden states are in this step
    only: a later step, or the prefix cache, does not have them), then every row but the last of
    the sequences run with drafts."""
    last, wanted, prompts, drafts = [], [], [], []
    offset = 0
    for i, (seq, q) in enumerate(zip(out.seqs, out.q_lens)):
        start, frm = seq.num_cached, seq.prompt_logits_from
        if frm is not None:
            lo, hi = max(start, frm), min(start + q, seq.num_prompt - 1)
            if hi > lo:
                prompts.append(PromptRows(seq=seq, lo=lo, hi=hi, first=len(wanted)))
                wanted.extend(range(offset + lo - start, offset + hi - start))
        elif seq.draft:
            drafts.append(DraftRows(index=i, first=len(wanted)))
            wanted.extend(range(offset, offset + q - 1))
        offset += q
        last.append(offset - 1)
    return last + wanted, prompts, drafts


@dataclass(slots=True)
class EngineStats:
    """Counters and gauges the metrics layer and the autoscaler read (plain data)."""
    num_waiting: int = 0
    num_running: int = 0
    kv_slots_total: int = 0
    kv_slots_used: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    preempted_total: int = 0
    steps_total: int = 0
    step_seconds_total: float = 0.0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    cancelled_total: int = 0
    prefix_query_tokens_total: int = 0    # tokens of the sequences that joined, looked up in the prefix cache
    prefix_hit_tokens_total: int = 0      # ... of which were cached already (not prefilled again)
    spec_draft_tokens_total: int = 0      # speculative decoding: draft tokens run through the model ...
    spec_accepted_tokens_total: int = 0   # ... of which the model agreed with (tokens gained)
    recent_step_seconds: list[float] = field(default_factory=list)
    phase_seconds_total: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


class Engine:
    def __init__(self, model: MoEModel, dispatch: ExpertDispatch, tokenizer: Tokenizer,
                 config: SchedulerConfig, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 ping_pong: bool = False, step_threads: Callable[[int], int] | None = None,
                 warm_targets: Iterable[WarmTarget] = (), speculative: SpeculativeConfig = SpeculativeConfig()):
        if config.max_model_len > model.config.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings {model.config.max_position_embeddings}")
        self.model, self.dispatch, self.tokenizer = model, dispatch, tokenizer
        # two micro-batches per step, overlapping attention with expert calls (micro_batch.py);
        # only where the dispatcher can submit and return (experts in other processes)
        self.ping_pong = ping_pong and getattr(dispatch, "overlaps", False)
        # tokens in a step -> torch threads for it (torch_threads.StepThreads); None: leave them
        self.step_threads = step_threads
        self.config = config
        self.speculative = speculative     # n-gram drafts at low load (speculative.py)
        self.device = device
        self.kv = KVCache(model.config, config.max_num_seqs, config.max_model_len, dtype, device,
                          block_size=config.block_size, num_blocks=config.kv_blocks)
        self.scheduler = Scheduler(config)
        self.eos_ids = frozenset(model.config.eos_token_ids)
        self.sampler = Sampler(eos_ids=self.eos_ids)
        self.stats = EngineStats(kv_slots_total=config.max_num_seqs, kv_blocks_total=config.kv_blocks)
        # the GEMM kernels of every row count a step may bring (serving/model/linear.py), built by the
        # first step, on the thread that runs the steps (oneDNN keys a kernel by the OpenMP threads of
        # the thread calling it), not in the first requests' steps: a replica's warm-up request makes it
        self._warm_targets = tuple(warm_targets)
        self.kernel_warm_up: WarmUpReport | None = None
        self._inbox_lock = threading.Lock()
        self._new: list[tuple[GenerationRequest, Emit, GuideMatcher | None]] = []
        self._guides: GuideCompiler | None = None     # built with the first guided request
        self._guides_lock = threading.Lock()
        self._aborts: set[str] = set()
        self._by_id: dict[str, Sequence] = {}

    # ---- thread-safe entry points -------------------------------------------------
    def add_request(self, request: GenerationRequest, emit: Emit) -> None:
        n, max_tokens = len(request.prompt_token_ids), request.sampling.max_tokens
        if n == 0:
            raise ValueError("prompt: must hold at least one token")
        if n + max_tokens > self.config.max_model_len:
            raise ValueError(f"max_tokens: prompt ({n}) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len ({self.config.max_model_len})")
        guide = request.sampling.guide
        matcher = None if guide is None else self._guide_compiler().matcher(guide)   # here, not on the step thread
        with self._inbox_lock:
            self._new.append((request, emit, matcher))

    def prepare_guides(self) -> bool:
        """Build guided decoding's compiler now (its vocabulary tables: ~0.5 s for a 32k vocabulary on
        this 2-core box), not in the first guided request's TTFT. False where xgrammar is missing."""
        try:
            self._guide_compiler()
        except GuidedDecodingUnavailable:
            log.warning("xgrammar is not installed: guided requests will be refused (UNIMPLEMENTED)")
            return False
        return True

    def _guide_compiler(self) -> GuideCompiler:
        with self._guides_lock:
            if self._guides is None:
                self._guides = GuideCompiler(self.tokenizer, self.model.config.vocab_size, sorted(self.eos_ids))
            return self._guides

    def abort(self, request_id: str) -> None:
        with self._inbox_lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._inbox_lock:
            if self._new or self._aborts:
                return True
        return self.scheduler.has_work()

    def fail_all(self, error: Exception) -> None:
        """Give up on every request (only after retries are exhausted): each stream gets `error`."""
        self._drain_inbox()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq, FinishReason.CANCELLED)
            self._by_id.pop(seq.request_id, None)
            seq.state.emit(error)
        self._refresh_gauges()

    # ---- the step -------------------------------------------------------------------
    def step(self) -> int:
        """Run one engine step. Returns the number of tokens processed (0 if idle)."""
        if self._warm_targets:
            w = self.kernel_warm_up = warm_up(self._warm_targets, threads_for=self.step_threads)
            self._warm_targets = ()
            log.info("built %d GEMM kernels (%d weight shapes x threads) in %.2f s", w.gemms, w.shapes, w.seconds)
        t_start = time.perf_counter()
        self._drain_inbox()
        if self.speculative.enabled:
            self._propose_drafts()
        out = self.scheduler.schedule()
        self._refresh_gauges()
        if not out.seqs:
            return 0
        t0 = time.perf_counter()
        experts = TimedDispatch(self.dispatch)
        rows, prompts, drafts = ([], [], []) if all(s.prompt_logits_from is None and not s.draft
                                                    for s in out.seqs) else step_rows(out)
        logits = self._execute(out, experts, rows if prompts or drafts else None)
        t_logits = time.perf_counter()
        B = len(out.seqs)
        if prompts:
            self._record_prompt_logprobs(prompts, logits[B:])
        self._update(out, logits[:B], drafts, logits[B:])
        t_end = time.perf_counter()
        dt = t_end - t0
        s = self.stats
        s.steps_total += 1
        s.step_seconds_total += dt
        s.recent_step_seconds.append(dt)
        del s.recent_step_seconds[:-256]
        for phase, seconds in step_phases(t_start, t0, t_logits, t_end, experts).items():
            s.phase_seconds_total[phase] += seconds
        self._refresh_gauges()
        return out.num_tokens

    def _execute(self, out: SchedulerOutput, dispatch: ExpertDispatch, rows: list[int] | None = None) -> torch.Tensor:
        """Logits of each sequence's last new token [B, V], then (with `rows`: step_rows) the
        prompt positions' and the drafts' rows [X, V]."""
        ids = [t for seq, q in zip(out.seqs, out.q_lens)      # a drafted sequence: its last token, then the drafts
               for t in seq.token_ids[seq.num_cached:seq.num_cached + q - len(seq.draft)] + list(seq.draft)]
        layout = BatchLayout(slots=tuple(s.slot for s in out.seqs),
                             start_pos=tuple(s.num_cached for s in out.seqs),
                             q_lens=out.q_lens, block_tables=out.block_tables)
        input_ids_T = torch.tensor(ids, dtype=torch.int64, device=self.device)
        if self.step_threads is not None and torch.get_num_threads() != (n := self.step_threads(len(ids))):
            torch.set_num_threads(n)
        if rows is not None:
            return self.model.forward(input_ids_T, layout, self.kv, dispatch,
                                      rows_R=torch.tensor(rows, dtype=torch.int64))   # [B + X, V]
        if self.ping_pong:
            return forward_ping_pong(self.model, input_ids_T, layout, self.kv, dispatch)   # [B, V]
        return self.model.forward(input_ids_T, layout, self.kv, dispatch)   # [B, V]

    @staticmethod
    def _record_prompt_logprobs(extra: list[PromptRows], logits_XV: torch.Tensor) -> None:
        """Each prompt token's logprob under the raw model (and the k most likely at its position),
        PROMPT_LOGPROB_ROWS rows at a time: the log_softmax of a step's whole [X, V] would be a
        second copy of its logits (a 2048-token chunk at a 128k vocab: 1 GiB in fp32)."""
        for pr in extra:
            seq, st = pr.seq, pr.seq.state
            k = seq.request.sampling.prompt_logprobs
            for lo in range(pr.lo, pr.hi, PROMPT_LOGPROB_ROWS):
                hi = min(lo + PROMPT_LOGPROB_ROWS, pr.hi)
                row = pr.first + lo - pr.lo
                lp_hV = logits_XV[row:row + hi - lo].float().log_softmax(dim=-1)
                targets_h = torch.tensor(seq.token_ids[lo + 1:hi + 1], dtype=torch.int64)
                st.prompt_logprobs.extend(lp_hV.gather(1, targets_h[:, None])[:, 0].tolist())
                if k:
                    vals, ids = lp_hV.topk(min(k, lp_hV.shape[1]), dim=-1)
                    st.prompt_top.extend((tuple(i), tuple(v)) for i, v in zip(ids.tolist(), vals.tolist()))
            seq.prompt_logits_from = pr.hi if pr.hi < seq.num_prompt - 1 else None

    def _propose_drafts(self) -> None:
        """Drafts for the running decodes that can take them, while few sequences run (speculative.py)."""
        running, sc = self.scheduler.running, self.speculative
        if len(running) > sc.max_seqs:
            return
        for seq in running:
            sp = seq.request.sampling
            left = min(sp.max_tokens - seq.num_generated, self.config.max_model_len - len(seq.token_ids)) - 1
            if seq.num_uncached == 1 and seq.num_generated > 0 and left > 0 and draftable(sp):
                seq.draft = propose(seq.token_ids, min(sc.num_tokens, left), sc)

    def _update(self, out: SchedulerOutput, logits_BV: torch.Tensor, drafts: list[DraftRows] = (),
                extra_XV: torch.Tensor | None = None) -> None:
        drafted = {d.index for d in drafts}
        for i, (seq, q) in enumerate(zip(out.seqs, out.q_lens)):
            if i not in drafted:
                self.scheduler.computed(seq, q)
        for d in drafts:
            self._accept_drafts(out.seqs[d.index], torch.cat((extra_XV[d.first:d.first + len(out.seqs[d.index].draft)],
                                                              logits_BV[d.index:d.index + 1])))
        # a sequence whose prompt is only partly prefilled (chunked) samples nothing this step
        rows = [i for i, seq in enumerate(out.seqs) if seq.num_uncached == 0 and i not in drafted]
        if not rows:
            return
        seqs = [out.seqs[i] for i in rows]
        if len(rows) < len(out.seqs):
            logits_BV = logits_BV[rows]
        guides = [s.state.guide for s in seqs]
        for s in seqs:                  # a seeded draw depends on the seed and the output position only
            if s.state.generator is not None:
                s.state.generator.manual_seed(position_seed(s.request.sampling.seed,
                                                            s.num_generated + s.request.resumed_tokens))
        tokens_B, logprobs_B, top = self.sampler.sample(
            logits_BV, [s.request.sampling for s in seqs], [s.state.generator for s in seqs],
            [(s.token_ids, s.num_prompt, s.num_prompt - s.request.resumed_tokens) for s in seqs],   # History
            guides if any(g is not None for g in guides) else None)
        for i, (seq, tok, lp) in enumerate(zip(seqs, tokens_B.tolist(), logprobs_B.tolist())):
            if guides[i] is not None and not guides[i].accept(tok):     # cannot happen: the mask allowed it
                self.scheduler.finish(seq, FinishReason.CANCELLED)
                self._by_id.pop(seq.request_id, None)
                seq.state.emit(RuntimeError(f"sampled token {tok} is outside the request's grammar"))
                continue
            seq.token_ids.append(tok)
            self.stats.generated_tokens_total += 1
            self._emit_token(seq, tok, lp, top.get(i))

    def _accept_drafts(self, seq: Sequence, logits_QV: torch.Tensor) -> None:
        """The tokens a sequence run with drafts gets this step: the accepted drafts, then one more
        (speculative.py: accept_greedy, accept_sampled); only their K/V count as computed (and may join the prefix cache)."""
        draft, seq.draft = seq.draft, ()
        sp = seq.request.sampling
        tokens = (accept_greedy(draft, logits_QV) if sp.greedy else
                  accept_sampled(draft, self.sampler.filtered_probs(logits_QV.float(), [sp] * len(logits_QV)),
                                 seq.state.generator))
        accepted = len(tokens) - 1
        self.stats.spec_draft_tokens_total += len(draft)
        self.stats.spec_accepted_tokens_total += accepted
        seq.token_ids.extend(tokens[:accepted])            # their K/V and the last token's are in the cache
        self.scheduler.computed(seq, 1 + accepted)
        del seq.token_ids[len(seq.token_ids) - accepted:]
        for tok in tokens:
            seq.token_ids.append(tok)
            self.stats.generated_tokens_total += 1
            self._emit_token(seq, tok, None)
            if seq.finish_reason is not None:               # a stop among them: the rest is not output
                return

    def _emit_token(self, seq: Sequence, tok: int, logprob: float | None,
                    top_logprobs: TopLogprobs | None = None) -> None:
        sp, st = seq.request.sampling, seq.state
        st.text += st.detok.push(tok)
        reason, end = None, None
        if ((tok in self.eos_ids and not sp.ignore_eos) or tok in sp.stop_token_ids
                or (st.guide is not None and st.guide.terminated)):
            reason = FinishReason.STOP
        elif sp.stop and seq.num_generated >= sp.min_tokens:
            window = max(0, st.text_sent - max(len(x) for x in sp.stop))
            hits = [p for p in (st.text.find(x, window) for x in sp.stop) if p >= 0]
            if hits:
                reason, end = FinishReason.STOP, max(min(hits), st.text_sent)
        if reason is None and (seq.num_generated >= sp.max_tokens
                               or len(seq.token_ids) >= self.config.max_model_len):
            reason = FinishReason.LENGTH
        if reason is not None and end is None:
            st.text += st.detok.flush()          # the last, possibly held-back, characters
        end = len(st.text) if end is None else end
        delta = st.text[st.text_sent:end]
        st.text_sent = end
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._by_id.pop(seq.request_id, None)
        prompt_lp = prompt_top = None
        if sp.prompt_logprobs is not None and seq.num_generated == 1:      # with the first token
            prompt_lp = tuple(st.prompt_logprobs)
            prompt_top = tuple(st.prompt_top) if sp.prompt_logprobs else None
        st.emit(TokenEvent(request_id=seq.request_id, token_id=tok, text_delta=delta,
                           logprob=logprob if sp.logprobs else None, finish_reason=reason,
                           prompt_tokens=seq.num_prompt, completion_tokens=seq.num_generated,
                           cached_tokens=max(seq.prefix_hit, 0), top_logprobs=top_logprobs,
                           prompt_logprobs=prompt_lp, prompt_top_logprobs=prompt_top))

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, set()
        for request, emit, matcher in new:
            sp = request.sampling
            gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
            state = _RequestState(emit=emit, generator=gen, detok=IncrementalDetokenizer(self.tokenizer),
                                  guide=matcher)
            if request.resumed_tokens:       # the earlier attempt's output: its text was streamed already
                for tok in request.prompt_token_ids[-request.resumed_tokens:]:
                    state.text += state.detok.push(tok)
                state.text_sent = len(state.text)
            self._by_id[request.request_id] = self.scheduler.add(request, state)
            self.stats.prompt_tokens_total += len(request.prompt_token_ids)
        for rid in aborts:
            seq = self._by_id.pop(rid, None)
            if seq is not None:       # frees the KV slot now, before this step is scheduled
                self.scheduler.finish(seq, FinishReason.CANCELLED)
                self.stats.cancelled_total += 1
        self._refresh_gauges()

    def _refresh_gauges(self) -> None:
        self.stats.num_waiting = self.scheduler.num_waiting
        self.stats.num_running = self.scheduler.num_running
        self.stats.kv_slots_used = self.config.max_num_seqs - len(self.scheduler.free_slots)
        self.stats.kv_blocks_used = self.scheduler.blocks.num_used
        self.stats.preempted_total = self.scheduler.num_preempted
        self.stats.prefix_query_tokens_total = self.scheduler.prefix_query_tokens
        self.stats.prefix_hit_tokens_total = self.scheduler.prefix_hit_tokens
