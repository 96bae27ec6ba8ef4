"""Paged KV-cache bookkeeping: which fixed-size blocks of the cache each sequence owns, and
(prefix caching) which blocks hold K/V that a new sequence can reuse.

A plain object (no torch): the scheduler asks it for room before it schedules a sequence's
tokens, and the engine hands the per-sequence block tables to the model through BatchLayout.
A sequence of n tokens owns ceil(n / block_size) blocks; blocks are taken from a free list as
it grows and all return when it finishes, is cancelled or is preempted.

Prefix caching (`prefix_caching=True`): once a sequence has filled a block (its K/V computed for
block_size tokens), the block is registered under its content: the block before it and its
block_size token ids (the first block: the sequence's cache salt and its tokens). A sequence
starting later whose tokens begin with registered blocks shares them (`cached_prefix`, `start`)
and computes only the rest: a chat's system prompt and earlier turns are prefilled once. Shared
blocks are full and nobody writes into them again (a sequence writes only past its cached
tokens). When the last sequence holding a registered block lets it go, the block keeps its K/V,
evictable: it is handed out again only when the free list is empty, least recently released
first (a sequence's tail before its head). Keys are compared exactly (the token tuples
themselves are the dict keys, chained by entry number, never by a hash alone), so a collision
can never hand a sequence another prompt's K/V. The salt keeps tenants apart
(serving/api/service.py): one tenant's cache hit never tells it another's prompt.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(frozen=True, slots=True)
class CachedBlock:
    """A block registered in the prefix cache: `key` = (previous entry's number, or the salt for a
    sequence's first block; the block's token ids)."""
    key: tuple
    block: int
    number: int        # this entry's number, unique for the manager's lifetime: its children chain on it


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}      # sequence handle (its batch slot) -> block ids
        self._refs = [0] * num_blocks                 # sequences holding each block
        self._by_key: dict[tuple, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()   # registered, held by nobody; LRU first
        self._chains: dict[int, list[int]] = {}      # sequence -> entry number of each of its full blocks
        self._next_number = 0

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take: free, or cached and held by nobody (evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or evictable)."""
        return len(self._by_block)

    def table(self, seq: int) -> list[int]:
        return self._tables.get(seq, [])

    def missing(self, seq: int, num_tokens: int) -> int:
        """Blocks `seq` still needs to hold `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.table(seq)))

    def ensure(self, seq: int, num_tokens: int) -> bool:
        """Grow `seq` to hold `num_tokens` tokens; False (and nothing taken) if short of blocks."""
        need = self.missing(seq, num_tokens)
        if need > self.num_free:
            return False
        if need:
            table = self._tables.setdefault(seq, [])
            table.extend(self._take() for _ in range(need))
        return True

    def free(self, seq: int) -> None:
        """`seq` lets go of its blocks: unregistered ones return to the free list, registered ones
        stay cached (evictable), its last blocks first in line for eviction."""
        self._chains.pop(seq, None)
        for block in reversed(self._tables.pop(seq, [])):
            self._release(block)

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block]:
            return
        if block in self._by_block:
            self._evictable[block] = None
        else:
            self._free.append(block)

    # ---- prefix caching ---------------------------------------------------------------

    def cached_prefix(self, token_ids: Sequence[int], salt: str = "") -> list[CachedBlock]:
        """The registered blocks that hold the longest run of whole blocks at the start of
        `token_ids`, leaving at least its last token to compute (its logits sample the next one)."""
        if not self.prefix_caching:
            return []
        found: list[CachedBlock] = []
        for j in range((len(token_ids) - 1) // self.block_size):
            entry = self._by_key.get(self._key(found[-1].number if found else None, salt, token_ids, j))
            if entry is None:
                break
            found.append(entry)
        return found

    def start(self, seq: int, prefix: Sequence[CachedBlock], num_tokens: int) -> bool:
        """Begin `seq` (holding nothing yet) with the shared blocks of `prefix`, then room for
        `num_tokens` tokens in all; False (and nothing taken) if short of blocks."""
        assert seq not in self._tables, f"sequence {seq} already holds blocks"
        revived = sum(1 for e in prefix if e.block in self._evictable)
        if blocks_for(num_tokens, self.block_size) - len(prefix) > self.num_free - revived:
            return False
        for e in prefix:
            self._hold(e.block)
        if prefix:
            self._tables[seq] = [e.block for e in prefix]
            self._chains[seq] = [e.number for e in prefix]
        return self.ensure(seq, num_tokens)         # room was checked above: always True

    def register(self, seq: int, token_ids: Sequence[int], num_computed: int, salt: str = "") -> None:
        """`seq`'s first `num_computed` tokens have their K/V in its blocks: register the blocks
        they fill. Where another sequence registered the same content first (both computed it in
        the same step: requests arriving together with one system prompt), `seq` switches to that
        block and its own copy returns to the free list, so they all share the same blocks from
        then on (and decode attention reads them once: layers.decode_attention's `prefix`)."""
        if not self.prefix_caching:
            return
        chain = self._chains.setdefault(seq, [])
        table = self._tables[seq]
        for j in range(len(chain), num_computed // self.block_size):
            key = self._key(chain[-1] if chain else None, salt, token_ids, j)
            entry = self._by_key.get(key)
            if entry is None:
                entry = CachedBlock(key, table[j], self._next_number)
                self._next_number += 1
                self._by_key[key] = self._by_block[table[j]] = entry
            elif entry.block != table[j]:          # full, never written again: the copies are the same K/V
                self._hold(entry.block)
                self._release(table[j])
                table[j] = entry.block
            chain.append(entry.number)

    def _key(self, parent: int | None, salt: str, token_ids: Sequence[int], j: int) -> tuple:
        """The cache key of block j: the entry number of the block before it (the salt for the
        first block) and its token ids."""
        bs = self.block_size
        return (("salt", salt) if parent is None else parent, tuple(token_ids[j * bs:(j + 1) * bs]))

    def _hold(self, block: int) -> None:
        """One more sequence holds a registered block (out of the evictable pool if nobody did)."""
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:                                   # the least recently released cached block
            block, _ = self._evictable.popitem(last=False)
            del self._by_key[self._by_block.pop(block).key]
        self._refs[block] = 1
        return block
