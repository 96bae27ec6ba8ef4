"""Paged KV-cache bookkeeping: which fixed-size blocks of the cache each sequence owns.

A plain object (no torch): the scheduler asks it for room before it schedules a sequence's
tokens, and the engine hands the per-sequence block tables to the model through BatchLayout.
A sequence of n tokens owns ceil(n / block_size) blocks; blocks are taken from a free list as
it grows and all return when it finishes, is cancelled or is preempted.
"""
from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}      # sequence handle (its batch slot) -> block ids

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def table(self, seq: int) -> list[int]:
        return self._tables.get(seq, [])

    def missing(self, seq: int, num_tokens: int) -> int:
        """Blocks `seq` still needs to hold `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.table(seq)))

    def ensure(self, seq: int, num_tokens: int) -> bool:
        """Grow `seq` to hold `num_tokens` tokens; False (and nothing taken) if the free list is short."""
        need = self.missing(seq, num_tokens)
        if need > len(self._free):
            return False
        if need:
            table = self._tables.setdefault(seq, [])
            table.extend(self._free.pop() for _ in range(need))
        return True

    def free(self, seq: int) -> None:
        self._free.extend(reversed(self._tables.pop(seq, [])))
