"""Run one call, or one engine step, with its own number of torch intra-op threads.

An engine replica runs on `engine_threads` torch threads (1 by default), because during the MoE
layers of a step its cores are shared with the expert shards, which compute at the same time. The
lm_head runs after the last MoE layer, when the shards have nothing to do: there the engine can
use more threads than the rest of the step (AppConfig.head_threads). Measured on this 2-core
machine, collective transport, one cluster alternating 1 and 2 threads for the lm_head only:
64 streams x 64 tokens 689-744 -> 772-819 tok/s (6 runs each); one request at a time, ITL p50
17.2-17.8 -> 15.6-16.0 ms (3 runs each). The 64 x 32k fp32 lm_head GEMM reads 65 MB of weights a
step, so a second core's share of the memory bandwidth is most of the gain.

Prefill steps are the same case: their attention runs on thousands of tokens while the shards wait.
`StepThreads` gives a step of at least `wide_tokens` tokens `wide` threads, the others `narrow`
(one cluster alternating with and without it, 64 streams whose 4096 prompt tokens prefill in two
steps: 725-797 -> 751-816 tok/s, 6 runs each, +2-4% in each of 3 pairs). Decode steps stay narrow:
with 64 tokens a step is many small ops, and on 2 threads each of them wakes the second thread
(64 streams 741-809 against 767-826 tok/s on 1; one at a time ITL p50 18.0-18.5 against 16.8-16.9 ms).

torch's thread count is process-wide: the wrapper sets it for the call and puts the caller's
count back, so it is for a process where one thread computes (an engine replica's step loop).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch intra-op threads; the previous count is restored after
    (nothing is set when it is already that)."""
    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class WithThreads:
    """`fn` called with `threads` torch intra-op threads; the previous count is restored after."""
    __slots__ = ("fn", "threads")

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], threads: int):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.fn, self.threads = fn, threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch_threads(self.threads):
            return self.fn(x)


@dataclass(frozen=True, slots=True)
class StepThreads:
    """The torch threads for an engine step of `num_tokens` tokens: `wide` from `wide_tokens` on."""
    narrow: int
    wide: int
    wide_tokens: int

    def __post_init__(self) -> None:
        if self.narrow < 1 or self.wide < 1 or self.wide_tokens < 1:
            raise ValueError(f"narrow, wide and wide_tokens must be >= 1, got {self}")

    def __call__(self, num_tokens: int) -> int:
        return self.wide if num_tokens >= self.wide_tokens else self.narrow
