"""ExpertShardWorker: the plain object behind one expert shard (in-process or a Serve replica).

It holds only the weights of its own experts, read tensor by tensor from the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from serving.model.config import MoEConfig
from serving.model.moe import ExpertWeights, experts_forward
from serving.model.weights import CheckpointReader, load_expert
from serving.parallel.placement import Placement


class ExpertShardWorker:
    def __init__(self, experts: dict[int, dict[int, ExpertWeights]], shard_id: int = 0):
        self.shard_id = shard_id
        self.experts = experts        # layer id -> expert id -> weights (only this shard's)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, placement: Placement, shard_id: int,
                        dtype: torch.dtype = torch.float32) -> "ExpertShardWorker":
        config = MoEConfig.from_dir(checkpoint_dir)
        reader = CheckpointReader(checkpoint_dir)
        experts = {layer: {e: load_expert(reader, config, layer, e, dtype) for e in ids}
                   for layer, ids in placement.experts_of(shard_id).items()}
        return cls(experts, shard_id)

    def expert_ids(self) -> dict[int, list[int]]:
        return {layer: sorted(ex) for layer, ex in self.experts.items()}

    def num_parameters(self) -> int:
        return sum(w.numel() for ex in self.experts.values() for ew in ex.values()
                   for w in (ew.gate_ID, ew.up_ID, ew.down_DI, ew.gate_bias_I, ew.up_bias_I, ew.down_bias_D)
                   if w is not None)

    @torch.inference_mode()
    def forward(self, layer: int, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor,
                topk_weights_NK: torch.Tensor) -> torch.Tensor:
        """Partial MoE output y_ND: the weighted sum over this shard's experts only."""
        return experts_forward(x_ND, topk_ids_NK, topk_weights_NK, self.experts[layer])
