"""Prefix affinity: which engine replica should serve a prompt, so that its prefix cache hits. No Ray.

Each engine replica keeps its own prefix cache (serving/engine/block_manager.py): a prompt whose
leading blocks a replica computed before is prefilled there from the first uncached block. Spread
by load alone, the turns of one conversation (or the requests of one long system prompt) land on
any replica, and with N replicas a follow-up turn finds its history cached about 1/N of the time.

This policy remembers, per replica, the prompt blocks recently routed there (an approximation of
its cache, as SGLang's router and Ray's PrefixCacheAffinityRouter keep one; the replica may have
evicted some) and ranks the replicas for a new prompt by what sending it there would cost:

  1. blocks(prompt) = chained hashes of its whole blocks: block_tokens token ids, or block_chars
     characters of a text prompt (the router does not tokenize). Block i's hash covers blocks 0..i.
  2. match(replica) = how many leading blocks the replica holds. No replica holds any: no
     preference (the caller routes by load alone, then `record`s where the request went).
  3. cost(replica) = the blocks it would prefill (blocks - match) + its requests in flight x
     load_cost_tokens / block_tokens: one request in flight weighs as much as prefilling
     load_cost_tokens prompt tokens. A conversation with a long history stays on its replica
     unless that one is much busier; a short shared prefix (a system prompt only one replica
     holds) spills to an idler replica after a few requests, which then holds it too, and from
     then on new conversations go by load.
  4. The ranking is the replicas grouped by cost, cheapest first: the caller takes the least loaded
     of the first group that accepts the request, the next group if none does. Equal costs go to
     the replica holding more of the prompt first: the prefill it saves is certain, while the
     in-flight counts are an estimate that lags (a caller's count of a request that just finished
     on its home replica may not be decremented yet when the conversation's next turn arrives).

Memory: at most max_blocks_per_replica hashes per replica, least recently routed dropped first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence


@dataclass(frozen=True, kw_only=True, slots=True)
class AffinityConfig:
    block_tokens: int = 16              # token-id prompts: one block = the engine's KV block (kv_block_size)
    block_chars: int = 64               # text prompts: one block = this many characters (~16 tokens)
    load_cost_tokens: int = 32          # one request in flight on a replica weighs as much as prefilling this
    max_blocks_per_replica: int = 100_000   # remembered block hashes per replica (LRU)

    def __post_init__(self):
        for name in ("block_tokens", "block_chars", "max_blocks_per_replica"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.load_cost_tokens < 0:
            raise ValueError(f"load_cost_tokens must be >= 0, got {self.load_cost_tokens}")


def prompt_blocks(prompt: str | Sequence[int], cfg: AffinityConfig, salt: str = "") -> list[int]:
    """Chained hashes of the prompt's whole blocks (a partial last block is never cached, so it
    does not count). `salt`: a namespace (the engine's cache salt, when the caller knows it)."""
    size = cfg.block_chars if isinstance(prompt, str) else cfg.block_tokens
    prev: Hashable = ("salt", salt)
    out = []
    for start in range(0, len(prompt) - size + 1, size):
        chunk = prompt[start:start + size]
        prev = hash((prev, chunk if isinstance(chunk, str) else tuple(chunk)))
        out.append(prev)
    return out


class PrefixAffinity:
    """The per-replica memory of routed prompt blocks, and the ranking it gives (module doc)."""

    def __init__(self, cfg: AffinityConfig = AffinityConfig()):
        self.cfg = cfg
        self._blocks: dict[Hashable, OrderedDict[int, None]] = {}   # replica -> block hashes, LRU first

    def match(self, blocks: Sequence[int], replica: Hashable) -> int:
        """How many of `blocks`, from the first, `replica` is believed to hold."""
        held = self._blocks.get(replica)
        n = 0
        if held:
            for b in blocks:
                if b not in held:
                    break
                n += 1
        return n

    def rank(self, blocks: Sequence[int], loads: Mapping[Hashable, int | None]) -> list[list[Hashable]] | None:
        """Replicas in groups of equal cost, cheapest first, or None: route by load alone.
        `loads`: each candidate replica's requests in flight (None: unknown, counted as 0)."""
        if not blocks or not loads:
            return None
        matches = {r: self.match(blocks, r) for r in loads}
        if not any(matches.values()):
            return None
        per_request = self.cfg.load_cost_tokens / self.cfg.block_tokens      # in blocks
        cost = {r: len(blocks) - matches[r] + (loads[r] or 0) * per_request for r in loads}
        groups: dict[tuple[float, int], list[Hashable]] = {}
        for r in sorted(loads, key=lambda r: (cost[r], -matches[r])):
            groups.setdefault((cost[r], -matches[r]), []).append(r)
        return list(groups.values())

    def record(self, blocks: Sequence[int], replica: Hashable) -> None:
        """`replica` now serves (so will cache) these blocks."""
        held = self._blocks.setdefault(replica, OrderedDict())
        for b in blocks:
            held[b] = None
            held.move_to_end(b)
        while len(held) > self.cfg.max_blocks_per_replica:
            held.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """A replica gone (or restarted with an empty cache)."""
        self._blocks.pop(replica, None)

    def keep_only(self, replicas: set) -> None:
        for r in [r for r in self._blocks if r not in replicas]:
            del self._blocks[r]

    def blocks_held(self, replica: Hashable) -> int:
        return len(self._blocks.get(replica, ()))
