"""Expert-parallel dispatch and combine, independent of how shards are reached.

Shape legend: T tokens in the step, N tokens sent to one shard, D hidden, K top-k, E experts.

For every MoE layer of every step (`ExpertDispatcher.__call__`):
  1. look up the shard owning each routed (token, k) slot:      owner_TK = owner_E[topk_ids_TK]
  2. for each shard s, pick the tokens with >= 1 slot on s:     idx_N = nonzero(any(owner_TK == s))
  3. send shard s only those tokens, with their top-k ids and weights; every shard is
     called at once through the transport (a shard ignores slots of experts it lacks)
  4. combine: scatter-add each shard's partial sums back:       y_TD[idx_N] += y_ND
The model never knows which transport it runs on; a transport only runs step 3.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from serving.parallel.placement import Placement


@dataclass(frozen=True, slots=True)
class ShardCall:
    shard: int
    x_ND: torch.Tensor
    topk_ids_NK: torch.Tensor
    topk_weights_NK: torch.Tensor


class Transport(Protocol):
    name: str

    def run(self, layer: int, calls: Sequence[ShardCall]) -> list[torch.Tensor]:
        """Run every call concurrently; return each shard's partial y_ND, in call order."""


class ExpertDispatcher:
    """dispatch(layer, x_TD, topk_ids_TK, topk_weights_TK) -> y_TD, via any transport.

    It also counts the tokens routed to each expert; `take_routed_counts` hands them to
    the engine's stats (metrics, load-aware placement) and resets them.
    """

    def __init__(self, placement: Placement, transport: Transport, num_experts: int):
        self.placement = placement
        self.transport = transport
        self.num_experts = num_experts
        self._owner_E = {layer: placement.owner_table(layer) for layer in placement.owners}
        self._lock = threading.Lock()
        self._routed_LE = {layer: torch.zeros(num_experts, dtype=torch.int64)
                           for layer in placement.owners}

    def __call__(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                 topk_weights_TK: torch.Tensor) -> torch.Tensor:
        counts_E = torch.bincount(topk_ids_TK.flatten(), minlength=self.num_experts)
        with self._lock:
            self._routed_LE[layer] += counts_E
        owner_TK = self._owner_E[layer][topk_ids_TK]                                   # 1
        calls, indices = [], []
        for s in range(self.placement.num_shards):
            idx_N = torch.nonzero((owner_TK == s).any(dim=1)).flatten()               # 2
            if idx_N.numel() == 0:
                continue
            if idx_N.numel() == x_TD.shape[0]:   # every token: send views, skip the gathers
                calls.append(ShardCall(s, x_TD, topk_ids_TK, topk_weights_TK))
            else:
                calls.append(ShardCall(s, x_TD[idx_N], topk_ids_TK[idx_N], topk_weights_TK[idx_N]))
            indices.append(idx_N)
        partials = self.transport.run(layer, calls)                                    # 3
        y_TD = torch.zeros_like(x_TD)
        for idx_N, y_ND in zip(indices, partials):                                     # 4
            y_TD.index_add_(0, idx_N, y_ND.to(x_TD.dtype))
        return y_TD

    def take_routed_counts(self) -> dict[int, list[int]]:
        """layer -> tokens routed to each expert since the last call (then reset)."""
        with self._lock:
            out = {layer: c.tolist() for layer, c in self._routed_LE.items()}
            for c in self._routed_LE.values():
                c.zero_()
        return out


class LocalTransport:
    """Every shard in this process: the reference transport, and EP=1."""
    name = "local"

    def __init__(self, workers: Sequence):   # ExpertShardWorker per shard, index = shard id
        self.workers = list(workers)

    def run(self, layer: int, calls: Sequence[ShardCall]) -> list[torch.Tensor]:
        return [self.workers[c.shard].forward(layer, c.x_ND, c.topk_ids_NK, c.topk_weights_NK)
                for c in calls]
