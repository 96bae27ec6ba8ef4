"""Continuous-batching scheduler with chunked prefill and a paged KV cache: a CPU-only object,
tested without Ray or a model.

Invariant: there is no decoding phase nor prefill phase. Every step, under a token budget
(`max_num_batched_tokens`):
  1. each running sequence that is decoding gets its one token (the budget is reserved for
     these first, so a long prompt never stalls the decoders);
  2. each running sequence still prefilling gets the next chunk of its prompt that fits;
  3. waiting requests join while a batch slot, KV blocks and budget allow, by priority class
     (interactive before batch), FIFO within a class; a prompt longer than what is left of the
     budget starts with a chunk and continues next step.
Before that, with `priority_preemption`, an interactive request that finds every slot taken
takes the slot of the newest running batch sequence (vLLM's priority policy): batch work never
holds an interactive request's time to first token hostage.
With `prefix_caching`, a request joining first takes the cached K/V blocks its tokens begin with
(serving/engine/block_manager.py) and prefills only the rest.
KV blocks are taken as sequences grow. When the cache is full, the newest running sequence of
the lowest priority class is preempted: its blocks are freed, and it goes back to the front of
its waiting queue to be recomputed (prompt + tokens generated so far) when there is room again.
Nothing it streamed is lost or repeated. Finished or cancelled sequences leave at once.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

from serving.engine.block_manager import BlockManager, blocks_for
from serving.engine.request import FinishReason, GenerationRequest, Priority


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 16               # KV slots = sequences decoded together
    max_num_batched_tokens: int = 4096   # new tokens per step (prefill + decode)
    max_model_len: int = 2048            # prompt + generated tokens per sequence
    block_size: int = 16                 # tokens per KV-cache block
    num_kv_blocks: int | None = None     # KV-cache size; None: every slot can hold max_model_len (no preemption)
    priority_preemption: bool = True     # a waiting interactive request preempts the newest running batch one
    prefix_caching: bool = False         # reuse the K/V of whole blocks a new sequence shares with earlier ones

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes one token per step")
        if self.num_kv_blocks is not None and self.num_kv_blocks < blocks_for(self.max_model_len, self.block_size):
            raise ValueError(f"num_kv_blocks ({self.num_kv_blocks}) cannot hold one sequence of max_model_len "
                             f"({self.max_model_len}) tokens in blocks of {self.block_size}")

    @property
    def kv_blocks(self) -> int:
        return (self.max_num_seqs * blocks_for(self.max_model_len, self.block_size)
                if self.num_kv_blocks is None else self.num_kv_blocks)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request: GenerationRequest
    token_ids: list[int]                 # prompt, then generated tokens
    num_prompt: int
    status: SeqStatus = SeqStatus.WAITING
    slot: int = -1                       # KV-cache slot while RUNNING
    num_cached: int = 0                  # tokens whose K/V are in the cache
    prefix_hit: int = -1                 # tokens found in the prefix cache when it first ran (-1: not yet)
    finish_reason: FinishReason | None = None
    state: Any = None                    # engine-owned per-request state (sampler rng, detokenizer)
    # prompt_logprobs: the first prompt position whose logits are still wanted (None: none are). Its
    # K/V must be computed, not taken from the prefix cache, so a cache hit is cut to before it.
    prompt_logits_from: int | None = None
    # speculative decoding: draft tokens the engine proposed for this step (serving/engine/speculative.py);
    # scheduled with the last token as one chunk when KV blocks and budget allow, else dropped
    draft: tuple[int, ...] = ()

    @property
    def num_uncached(self) -> int:
        """Tokens still to run through the model: the (rest of the) prompt, or the last sampled token."""
        return len(self.token_ids) - self.num_cached

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    seqs: tuple[Sequence, ...]           # B sequences in this step, in batch order
    q_lens: tuple[int, ...]              # new tokens of each (a prompt chunk, or 1)
    num_prefill: int                     # how many of them are prefilling
    block_tables: tuple[tuple[int, ...], ...] = ()   # each one's KV blocks

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)


def prefix_pending(seq: Sequence, hit: int, chosen: list[tuple[Sequence, int]], block_size: int) -> bool:
    """Whether a sequence of this step computes the first block `seq` would compute itself (the
    same tokens up to its end, the same cache salt): `seq` then waits one step and finds the block
    cached instead of computing it again. Requests arriving together with one system prompt
    otherwise all compute it in the first step (64 with a 512-token prompt: 3 of them did, 1536
    tokens of a 2048-token step spent on copies)."""
    end = hit + block_size
    if end >= len(seq.token_ids):              # no whole block left to share (its last token is its own)
        return False
    salt, head = seq.request.cache_salt, seq.token_ids[:end]
    return any(other.request.cache_salt == salt and other.num_cached <= hit and end <= other.num_cached + q
               and other.token_ids[:end] == head for other, q in chosen if q > 1)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._waiting: dict[Priority, deque[Sequence]] = {p: deque() for p in sorted(Priority)}
        self.running: list[Sequence] = []
        self.free_slots: list[int] = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preempted = 0
        self.blocks = BlockManager(config.kv_blocks, config.block_size, prefix_caching=config.prefix_caching)
        self.prefix_query_tokens = 0         # tokens of the sequences that joined (looked up in the prefix cache)
        self.prefix_hit_tokens = 0           # ... of which were cached already

    def add(self, request: GenerationRequest, state: Any = None) -> Sequence:
        n = len(request.prompt_token_ids)
        if n + request.sampling.max_tokens > self.config.max_model_len:
            raise ValueError(f"prompt ({n}) + max_tokens ({request.sampling.max_tokens}) exceeds "
                             f"max_model_len ({self.config.max_model_len})")
        seq = Sequence(request=request, token_ids=list(request.prompt_token_ids), num_prompt=n,
                       state=state,
                       prompt_logits_from=0 if request.sampling.prompt_logprobs is not None and n > 1 else None)
        self._waiting[request.priority].append(seq)
        return seq

    @property
    def waiting(self) -> list[Sequence]:
        """Waiting sequences in the order they will be admitted."""
        return [seq for q in self._waiting.values() for seq in q]

    def _next_waiting(self) -> deque[Sequence] | None:
        return next((q for q in self._waiting.values() if q), None)

    def schedule(self) -> SchedulerOutput:
        if self.config.priority_preemption:
            self._preempt_for_priority()
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        decoding = [s for s in self.running if s.num_uncached == 1]
        prefilling = [s for s in self.running if s.num_uncached > 1]
        for seq in decoding:                                       # 1. decodes first: never starve them
            if seq.status is SeqStatus.RUNNING and self._reserve(seq, 1, chosen):
                q = 1 + len(seq.draft)                             # drafts only where there is room already
                if q > 1 and not (q <= budget and self.blocks.ensure(seq.slot, seq.num_cached + q)):
                    seq.draft, q = (), 1
                chosen.append((seq, q))
                budget -= q
        for seq in prefilling:                                     # 2. prompts under way, a chunk each
            q = min(seq.num_uncached, budget)
            if q > 0 and seq.status is SeqStatus.RUNNING and self._reserve(seq, q, chosen):
                chosen.append((seq, q))
                budget -= q
        num_prefill = len(chosen) - len([s for s in decoding if s.status is SeqStatus.RUNNING])
        while budget > 0 and self.free_slots and (queue := self._next_waiting()) is not None:   # 3. new ones
            seq = queue[0]
            prefix = self.blocks.cached_prefix(seq.token_ids, seq.request.cache_salt)
            if seq.prompt_logits_from is not None:
                prefix = prefix[:seq.prompt_logits_from // self.config.block_size]
            hit = len(prefix) * self.config.block_size
            if self.config.prefix_caching and prefix_pending(seq, hit, chosen, self.config.block_size):
                break                                              # next step it finds that block cached
            q = min(len(seq.token_ids) - hit, budget)
            if not self.blocks.start(self.free_slots[-1], prefix, hit + q):
                break                                              # no room: wait (never preempt for a newcomer)
            queue.popleft()
            seq.slot = self.free_slots.pop()
            seq.status, seq.num_cached = SeqStatus.RUNNING, hit
            if seq.prefix_hit < 0:                                 # a preempted one rejoining keeps the first
                seq.prefix_hit = hit
            self.prefix_query_tokens += len(seq.token_ids)
            self.prefix_hit_tokens += hit
            self.running.append(seq)
            chosen.append((seq, q))
            budget -= q
            num_prefill += 1
        return SchedulerOutput(tuple(s for s, _ in chosen), tuple(q for _, q in chosen), num_prefill,
                               tuple(tuple(self.blocks.table(s.slot)) for s, _ in chosen))

    def computed(self, seq: Sequence, q: int) -> None:
        """The step ran `seq`'s next q tokens: their K/V are in its blocks now (and the blocks they
        filled join the prefix cache)."""
        seq.num_cached += q
        self.blocks.register(seq.slot, seq.token_ids, seq.num_cached, seq.request.cache_salt)

    def _preempt_for_priority(self) -> None:
        """Free slots for the waiting requests of the highest waiting class by preempting the newest
        running sequences of lower classes (they are recomputed when their turn comes)."""
        queue = self._next_waiting()
        if queue is None or len(queue) <= len(self.free_slots):
            return
        prio = queue[0].request.priority
        for victim in reversed([s for s in self.running if s.request.priority > prio]
                               [-(len(queue) - len(self.free_slots)):]):
            self.preempt(victim)

    def _reserve(self, seq: Sequence, q: int, chosen: list[tuple[Sequence, int]]) -> bool:
        """KV blocks for `seq`'s next q tokens, preempting others if the cache is full.
        False if `seq` itself had to be preempted."""
        while not self.blocks.ensure(seq.slot, seq.num_cached + q):   # the common case: room, one check
            scheduled = {id(s) for s, _ in chosen}                       # never preempt one already in this step
            _, _, victim = max((s.request.priority, i, s) for i, s in enumerate(self.running)
                               if id(s) not in scheduled)
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's slot and blocks; it waits at the front of its queue to be recomputed."""
        self.running.remove(seq)
        self.blocks.free(seq.slot)
        self.free_slots.append(seq.slot)
        seq.slot, seq.num_cached, seq.status, seq.draft = -1, 0, SeqStatus.WAITING, ()
        self._waiting[seq.request.priority].appendleft(seq)
        self.num_preempted += 1

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence now (finished or cancelled) and free its KV slot."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.slot)
            self.free_slots.append(seq.slot)
            seq.slot = -1
        else:
            self._waiting[seq.request.priority].remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0
