"""Expert-parallel dispatch and combine, independent of how shards are reached.

Shape legend: T tokens in the step, N tokens sent to one shard, D hidden, K top-k, E experts,
C copies of an expert (redundant experts live on several shards).

For every MoE layer of every step (`ExpertDispatcher.__call__`):
  1. pick the copy serving each routed (token, k) slot, spreading a replicated expert's
     tokens over its copies by token index and call count c:
                                         shard_TK = copies_EC[ids_TK, (t + c) mod ncopies_E[ids_TK]]
  2. for each shard s, pick the tokens with >= 1 slot on s:      idx_N = nonzero(any(shard_TK == s))
  3. send shard s only those tokens, their top-k weights, and their top-k ids with the slots
     served elsewhere replaced by the sentinel E (no shard holds it); every shard is called
     at once through the transport
  4. combine: scatter-add each shard's partial sums back:        y_TD[idx_N] += y_ND
With one shard (S = 1) steps 1, 2 and 4 are the identity: the shard gets the layer's call as is,
and its sum is y_TD.
The model never knows which transport it runs on; a transport only runs step 3.
`submit` returns after step 3 has started, `wait` does step 4: with a transport that has
`submit` (serve, collective) the caller can work on another micro-batch meanwhile.
"""
from __future__ import annotations

import threading
import time
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

    # Optional: def submit(self, layer, calls) -> Pending  (start the calls, return at once)


class Pending(Protocol):
    def wait(self) -> list[torch.Tensor]:
        """Each shard's partial y_ND, in call order (blocks until they are all back)."""


class Done:
    """A Pending whose results are already here."""

    def __init__(self, partials: list[torch.Tensor]):
        self.partials = partials

    def wait(self) -> list[torch.Tensor]:
        return self.partials


class PendingDispatch:
    """One MoE layer's expert calls in flight; `wait` combines them into y_TD."""

    def __init__(self, x_TD: torch.Tensor, indices: list[torch.Tensor] | None, pending: Pending):
        self.x_TD, self.indices, self.pending = x_TD, indices, pending     # indices None: one call, every token

    def wait(self) -> torch.Tensor:
        if self.indices is None:
            return self.pending.wait()[0].to(self.x_TD.dtype)
        y_TD = torch.zeros_like(self.x_TD)
        for idx_N, y_ND in zip(self.indices, self.pending.wait()):                      # 4
            y_TD.index_add_(0, idx_N, y_ND.to(self.x_TD.dtype))
        return y_TD


class ExpertDispatcher:
    """dispatch(layer, x_TD, topk_ids_TK, topk_weights_TK) -> y_TD, via any transport.

    It also counts the tokens routed to each expert on each shard; `take_routed_counts`
    hands them to the engine's stats (metrics, load-aware placement) and resets them.
    `set_placement` swaps the placement; the engine calls it between steps.
    """

    def __init__(self, placement: Placement, transport: Transport, num_experts: int):
        self.transport = transport
        self.num_experts = num_experts
        self._lock = threading.Lock()
        self._calls = 0               # rotates which copy of a replicated expert serves a token
        self.set_placement(placement)

    def set_placement(self, placement: Placement) -> None:
        tables = {layer: placement.copy_table(layer) for layer in placement.layers}
        with self._lock:
            self.placement, self._tables = placement, tables
            self._routed_LSE = {layer: torch.zeros(placement.num_shards, self.num_experts, dtype=torch.int64)
                                for layer in placement.layers}

    def __call__(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                 topk_weights_TK: torch.Tensor) -> torch.Tensor:
        return self.submit(layer, x_TD, topk_ids_TK, topk_weights_TK).wait()

    def submit(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
               topk_weights_TK: torch.Tensor) -> PendingDispatch:
        """Steps 1-3 now; the combine (4) when the caller waits. With a transport that can
        `submit`, the shards work while the caller does something else (micro_batch.py)."""
        E, S = self.num_experts, self.placement.num_shards
        if S == 1:            # one shard holds every expert: it takes the call as is, and its sum is y_TD
            counts_SE = torch.bincount(topk_ids_TK.flatten(), minlength=E).view(1, E)
            calls, indices = [ShardCall(0, x_TD, topk_ids_TK, topk_weights_TK)], None
        else:
            counts_SE, calls, indices = self._split(layer, x_TD, topk_ids_TK, topk_weights_TK)
        with self._lock:
            self._routed_LSE[layer] += counts_SE
        start = getattr(self.transport, "submit", None)
        pending = start(layer, calls) if start is not None else Done(self.transport.run(layer, calls))
        return PendingDispatch(x_TD, indices, pending)

    def _split(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
               ) -> tuple[torch.Tensor, list[ShardCall], list[torch.Tensor]]:
        """Steps 1-3 over S > 1 shards: the tokens routed to each (shard, expert) [S, E], each shard's
        call, and the token indices idx_N each call carries."""
        E, S = self.num_experts, self.placement.num_shards
        copies_EC, ncopies_E = self._tables[layer]
        self._calls += 1
        t_T1 = torch.arange(self._calls, self._calls + x_TD.shape[0]).unsqueeze(1)
        shard_TK = copies_EC[topk_ids_TK, t_T1 % ncopies_E[topk_ids_TK]]                 # 1
        counts_SE = torch.bincount((shard_TK * E + topk_ids_TK).flatten(), minlength=S * E).view(S, E)
        calls, indices = [], []
        for s in range(S):
            mine_TK = shard_TK == s
            idx_N = torch.nonzero(mine_TK.any(dim=1)).flatten()                          # 2
            if idx_N.numel() == 0:
                continue
            ids_NK = torch.where(mine_TK, topk_ids_TK, E)[idx_N]                          # 3
            calls.append(ShardCall(s, x_TD[idx_N], ids_NK, topk_weights_TK[idx_N]))
            indices.append(idx_N)
        return counts_SE, calls, indices

    @property
    def overlaps(self) -> bool:
        """Whether submitted calls run while the caller goes on (the transport can `submit`)."""
        return hasattr(self.transport, "submit")

    def shard_busy_seconds(self) -> dict[int, float]:
        """shard -> seconds it has spent computing its experts so far, where the transport knows
        (`local`, `collective`); {} where it does not (`serve`)."""
        busy = getattr(self.transport, "busy_seconds", None)
        return busy() if busy is not None else {}

    def take_routed_counts(self) -> dict[int, list[list[int]]]:
        """layer -> [shard][expert] tokens routed since the last call (then reset)."""
        with self._lock:
            out = {layer: c.tolist() for layer, c in self._routed_LSE.items()}
            for c in self._routed_LSE.values():
                c.zero_()
        return out


class LocalTransport:
    """Every shard in this process: the reference transport, and EP=1."""
    name = "local"

    def __init__(self, workers: Sequence):   # ExpertShardWorker per shard, index = shard id
        self.workers = list(workers)
        self._busy_s = [0.0] * len(self.workers)

    def run(self, layer: int, calls: Sequence[ShardCall]) -> list[torch.Tensor]:
        out = []
        for c in calls:
            t0 = time.perf_counter()
            out.append(self.workers[c.shard].forward(layer, c.x_ND, c.topk_ids_NK, c.topk_weights_NK))
            self._busy_s[c.shard] += time.perf_counter() - t0
        return out

    def busy_seconds(self) -> dict[int, float]:
        return dict(enumerate(self._busy_s))

    def warm_targets(self, max_rows: int) -> list:
        """Every shard's linears (linear.warm_up), on the caller's threads."""
        return [t for w in self.workers for t in w.warm_targets(max_rows)]
