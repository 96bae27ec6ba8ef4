"""ExpertShardWorker: the plain object behind one expert shard (in-process or a Serve replica).

It holds only the weights of its own experts, read tensor by tensor from the checkpoint.
After a rebalance it loads, on first use, only the experts it newly serves (`loader`), and
`retain` drops the ones the new placement no longer gives it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch

from serving.model.config import MoEConfig
from serving.model.linear import WarmTarget
from serving.model.moe import ExpertWeights, experts_forward
from serving.model.weights import CheckpointReader, load_expert
from serving.parallel.placement import Placement


ExpertLoader = Callable[[int, int], ExpertWeights]      # (layer, expert) -> weights


class ExpertShardWorker:
    def __init__(self, experts: dict[int, dict[int, ExpertWeights]], shard_id: int = 0,
                 loader: ExpertLoader | None = None, num_experts: int = 0):
        self.shard_id = shard_id
        self.experts = experts        # layer id -> expert id -> weights (only this shard's)
        self.loader = loader          # reads one expert from the checkpoint, for rebalancing
        self.num_experts = num_experts  # ids >= this are the dispatcher's "no expert" sentinel
        self.loads_total = 0          # experts loaded after start (each one newly needed)
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, placement: Placement, shard_id: int,
                        dtype: torch.dtype = torch.float32) -> "ExpertShardWorker":
        config = MoEConfig.from_dir(checkpoint_dir)
        reader = CheckpointReader(checkpoint_dir)
        load = lambda layer, e: load_expert(reader, config, layer, e, dtype)    # noqa: E731
        experts = {layer: {e: load(layer, e) for e in ids}
                   for layer, ids in placement.experts_of(shard_id).items()}
        return cls(experts, shard_id, loader=load, num_experts=config.num_experts)

    def retain(self, keep: dict[int, tuple[int, ...]]) -> None:
        """Drop the experts not in `keep` (layer -> experts this shard serves now)."""
        with self._lock:
            for layer, ex in self.experts.items():
                for e in [e for e in ex if e not in keep.get(layer, ())]:
                    del ex[e]

    def _ensure(self, layer: int, topk_ids_NK: torch.Tensor) -> dict[int, ExpertWeights]:
        held = self.experts.setdefault(layer, {})
        if self.loader is None or len(held) == self.num_experts:       # nothing it could be missing
            return held
        wanted = [e for e in torch.unique(topk_ids_NK).tolist() if e not in held and 0 <= e < self.num_experts]
        if wanted:
            with self._lock:
                for e in wanted:
                    held[e] = self.loader(layer, e)
                    self.loads_total += 1
        return held

    def expert_ids(self) -> dict[int, list[int]]:
        return {layer: sorted(ex) for layer, ex in self.experts.items()}

    def num_parameters(self) -> int:
        return sum(w.numel() for ex in self.experts.values() for ew in ex.values()
                   for w in (ew.gate_ID, ew.up_ID, ew.down_DI, ew.gate_bias_I, ew.up_bias_I, ew.down_bias_D)
                   if w is not None)

    def warm_targets(self, max_rows: int) -> list[WarmTarget]:
        """Its experts' linears, each called with at most `max_rows` rows (the engine's tokens per
        step: a token reaches an expert once), for `linear.warm_up`."""
        return [WarmTarget(lin, lin, max_rows) for ex in self.experts.values() for ew in ex.values()
                for lin in (ew.gate_up, ew.down)]

    @torch.inference_mode()
    def forward(self, layer: int, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor,
                topk_weights_NK: torch.Tensor) -> torch.Tensor:
        """Partial MoE output y_ND: the weighted sum over the experts sent to this shard."""
        return experts_forward(x_ND, topk_ids_NK, topk_weights_NK, self._ensure(layer, topk_ids_NK))
