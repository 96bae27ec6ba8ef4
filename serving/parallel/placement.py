"""Which shard holds which expert of which MoE layer, with redundant copies of hot experts.

A placement maps every expert of every MoE layer to one or more shards in 0..S-1:
`copies[layer][expert] = (shard, ...)`, the first being its primary. Shard s holds exactly
the experts with s among their copies, and loads only their weights. The dispatcher spreads
a replicated expert's tokens across its copies.

Strategies:
  contiguous   experts [0, E/S) on shard 0, the next block on shard 1, ...
  round_robin  expert e on shard e mod S
  load_aware   EPLB-style, from observed tokens per expert: the hottest experts get redundant
               copies, then copies go greedily (heaviest first) to the least-loaded shard,
               every shard holding the same number of expert slots.
"""
from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from serving.model.config import MoEConfig

STRATEGIES = ("contiguous", "round_robin", "load_aware")


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    num_shards: int                                        # S
    copies: dict[int, tuple[tuple[int, ...], ...]]         # layer id -> per expert: shards holding it
    version: int = 0                                       # bumped by every rebalance

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        for layer, row in self.copies.items():
            for e, shards in enumerate(row):
                if not shards or len(set(shards)) != len(shards):
                    raise ValueError(f"layer {layer} expert {e}: copies {shards} must be non-empty and distinct")
                bad = [s for s in shards if not 0 <= s < self.num_shards]
                if bad:
                    raise ValueError(f"layer {layer} expert {e}: shard ids {bad} outside 0..{self.num_shards - 1}")

    # ---- building ------------------------------------------------------------------------
    @classmethod
    def build(cls, config: MoEConfig, num_shards: int, strategy: str = "contiguous",
              load: Mapping[int, Sequence[float]] | None = None, redundant: int | None = None) -> "Placement":
        """`load`: layer -> tokens per expert (load_aware only); `redundant`: extra copies per
        layer (load_aware only; default S)."""
        E, S = config.num_experts, num_shards
        if not 1 <= S <= E:
            raise ValueError(f"expert_shards must be in 1..{E} (num_experts), got {S}")
        if strategy == "contiguous":
            row = tuple((e * S // E,) for e in range(E))
        elif strategy == "round_robin":
            row = tuple((e % S,) for e in range(E))
        elif strategy == "load_aware":
            load = load or {}
            r = S if redundant is None else redundant
            return cls(num_shards=S, copies={layer: balance_layer(load.get(layer, [1.0] * E), S, r)
                                             for layer in config.moe_layer_ids})
        else:
            raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}")
        return cls(num_shards=S, copies={layer: row for layer in config.moe_layer_ids})

    # ---- queries ---------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.copies)

    def experts_of(self, shard: int) -> dict[int, tuple[int, ...]]:
        """layer id -> the experts shard `shard` holds in that layer (copies included)."""
        return {layer: tuple(e for e, shards in enumerate(row) if shard in shards)
                for layer, row in self.copies.items()}

    def copy_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(copies_EC, ncopies_E) int64 for vectorised lookups; rows padded with their primary.
        Row E (one past the last expert) is the "no expert" sentinel: shard -1."""
        row = self.copies[layer]
        C = max(len(s) for s in row)
        table = [list(s) + [s[0]] * (C - len(s)) for s in row] + [[-1] * C]
        return (torch.tensor(table, dtype=torch.int64),
                torch.tensor([len(s) for s in row] + [1], dtype=torch.int64))

    def predicted_shard_load(self, load: Mapping[int, Sequence[float]]) -> dict[int, list[float]]:
        """layer -> expected tokens on each shard, a replicated expert's load split evenly."""
        out = {}
        for layer, row in self.copies.items():
            per = [0.0] * self.num_shards
            for e, shards in enumerate(row):
                for s in shards:
                    per[s] += load[layer][e] / len(shards)
            out[layer] = per
        return out

    def predicted_imbalance(self, load: Mapping[int, Sequence[float]]) -> dict[int, float]:
        """layer -> max shard load / mean shard load (1.0 is perfect)."""
        return {layer: imbalance(per) for layer, per in self.predicted_shard_load(load).items()}

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"num_shards": self.num_shards, "version": self.version,
                           "copies": {str(k): [list(s) for s in v] for k, v in self.copies.items()}})

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        d = json.loads(text)
        return cls(num_shards=d["num_shards"], version=d.get("version", 0),
                   copies={int(k): tuple(tuple(s) for s in v) for k, v in d["copies"].items()})


def imbalance(per_shard: Sequence[float]) -> float:
    mean = sum(per_shard) / len(per_shard)
    return max(per_shard) / mean if mean > 0 else 1.0


def balance_layer(load_E: Sequence[float], num_shards: int, redundant: int) -> tuple[tuple[int, ...], ...]:
    """EPLB-style placement of one layer: returns per expert the shards holding a copy.

    1. give `redundant` extra copies, one at a time, to the expert with the most load per copy
       (an expert has at most S copies);
    2. every shard gets the same number of slots: ceil((E + redundant) / S);
    3. place copies heaviest first (load / copies), each on the least-loaded shard that has a
       free slot and does not already hold that expert.
    """
    E, S = len(load_E), num_shards
    load = [max(float(x), 0.0) for x in load_E]
    n_copies = [1] * E
    heap = [(-load[e], e) for e in range(E)]
    heapq.heapify(heap)
    for _ in range(min(redundant, E * (S - 1))):                                       # 1
        neg, e = heapq.heappop(heap)
        while n_copies[e] >= S:
            neg, e = heapq.heappop(heap)
        n_copies[e] += 1
        heapq.heappush(heap, (-load[e] / n_copies[e], e))
    slots = math.ceil(sum(n_copies) / S)                                               # 2
    units = sorted(((load[e] / n_copies[e], e) for e in range(E) for _ in range(n_copies[e])),
                   key=lambda u: (-u[0], u[1]))
    shard_load, shard_used = [0.0] * S, [0] * S
    copies: list[list[int]] = [[] for _ in range(E)]
    for w, e in units:                                                                 # 3
        free = [s for s in range(S) if shard_used[s] < slots and s not in copies[e]]
        if not free:          # only shards already holding e have room: one copy fewer
            continue
        s = min(free, key=lambda s: (shard_load[s], shard_used[s], s))
        copies[e].append(s)
        shard_load[s] += w
        shard_used[s] += 1
    return tuple(tuple(c) for c in copies)
