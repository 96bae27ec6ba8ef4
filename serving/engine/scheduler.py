"""Continuous-batching scheduler: a CPU-only object, tested without Ray or a model.

Invariant: there is no decoding phase nor prefill phase. Every step, each running
sequence is given the tokens it still needs (its whole prompt the first time, then one
token), new requests join at the step boundary while a KV slot and the token budget
allow, and finished or cancelled sequences leave (and free their slot) at once.
Waiting requests join by priority class (interactive before batch), FIFO within a class.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from serving.engine.request import FinishReason, GenerationRequest, Priority


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 16               # KV slots = sequences decoded together
    max_num_batched_tokens: int = 4096   # new tokens per step (prefill + decode)
    max_model_len: int = 2048            # prompt + generated tokens per sequence


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
    finish_reason: FinishReason | None = None
    state: Any = None                    # engine-owned per-request state (sampler rng, detokenizer)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    seqs: tuple[Sequence, ...]           # B sequences in this step, in batch order
    q_lens: tuple[int, ...]              # new tokens of each (prompt length, or 1)
    num_prefill: int                     # how many of them are prefilling

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._waiting: dict[Priority, deque[Sequence]] = {p: deque() for p in sorted(Priority)}
        self.running: list[Sequence] = []
        self.free_slots: list[int] = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preempted = 0

    def add(self, request: GenerationRequest, state: Any = None) -> Sequence:
        n = len(request.prompt_token_ids)
        if n + request.sampling.max_tokens > self.config.max_model_len:
            raise ValueError(f"prompt ({n}) + max_tokens ({request.sampling.max_tokens}) exceeds "
                             f"max_model_len ({self.config.max_model_len})")
        seq = Sequence(request=request, token_ids=list(request.prompt_token_ids), num_prompt=n,
                       state=state)
        self._waiting[request.priority].append(seq)
        return seq

    @property
    def waiting(self) -> list[Sequence]:
        """Waiting sequences in the order they will be admitted."""
        return [seq for q in self._waiting.values() for seq in q]

    def _next_waiting(self) -> deque[Sequence] | None:
        return next((q for q in self._waiting.values() if q), None)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        seqs, q_lens = [], []
        for seq in self.running:                       # decodes first: never starve them
            q = len(seq.token_ids) - seq.num_cached
            seqs.append(seq)
            q_lens.append(q)
            budget -= q
        num_prefill = 0
        while self.free_slots and (queue := self._next_waiting()) is not None:   # then new ones
            seq = queue[0]
            q = len(seq.token_ids) - seq.num_cached
            if q > budget and seqs:                    # a lone prompt always fits eventually
                break
            queue.popleft()
            seq.slot = self.free_slots.pop()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            q_lens.append(q)
            budget -= q
            num_prefill += 1
        return SchedulerOutput(tuple(seqs), tuple(q_lens), num_prefill)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence now (finished or cancelled) and free its KV slot."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
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
