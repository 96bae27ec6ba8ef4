"""Which shard holds which expert of which MoE layer.

A placement is a table owner[layer][expert] -> shard in 0..S-1. Shard s holds exactly
the experts {e : owner[l][e] == s} of every MoE layer l, and loads only their weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from serving.model.config import MoEConfig

STRATEGIES = ("contiguous", "round_robin")


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    num_shards: int                                   # S
    owners: dict[int, tuple[int, ...]]                # layer id -> shard of each expert [E]

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        for layer, row in self.owners.items():
            bad = [s for s in row if not 0 <= s < self.num_shards]
            if bad:
                raise ValueError(f"layer {layer}: shard ids {bad} outside 0..{self.num_shards - 1}")

    @classmethod
    def build(cls, config: MoEConfig, num_shards: int, strategy: str = "contiguous") -> "Placement":
        E, S = config.num_experts, num_shards
        if not 1 <= S <= E:
            raise ValueError(f"expert_shards must be in 1..{E} (num_experts), got {S}")
        if strategy == "contiguous":     # experts [0, E/S) on shard 0, the next block on shard 1, ...
            row = tuple(e * S // E for e in range(E))
        elif strategy == "round_robin":  # expert e on shard e mod S
            row = tuple(e % S for e in range(E))
        else:
            raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}")
        return cls(num_shards=S, owners={layer: row for layer in config.moe_layer_ids})

    def experts_of(self, shard: int) -> dict[int, tuple[int, ...]]:
        """layer id -> the experts shard `shard` holds in that layer."""
        return {layer: tuple(e for e, s in enumerate(row) if s == shard)
                for layer, row in self.owners.items()}

    def owner_table(self, layer: int) -> torch.Tensor:
        """owner_E: shard of each expert of `layer`, as an int64 tensor for vectorised lookups."""
        return torch.tensor(self.owners[layer], dtype=torch.int64)

    def to_json(self) -> str:
        return json.dumps({"num_shards": self.num_shards,
                           "owners": {str(k): list(v) for k, v in self.owners.items()}})

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        d = json.loads(text)
        return cls(num_shards=d["num_shards"],
                   owners={int(k): tuple(v) for k, v in d["owners"].items()})
