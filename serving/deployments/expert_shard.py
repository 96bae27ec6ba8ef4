"""ExpertShard deployment: a shim around ExpertShardWorker (one deployment per shard)."""
from __future__ import annotations

import ray
import torch
from ray import serve

from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement


@serve.deployment
class ExpertShard:
    def __init__(self, checkpoint: str, placement_json: str, shard_id: int, dtype: str):
        from serving.deployments.config import DTYPES
        torch.set_num_threads(1)
        self.worker = ExpertShardWorker.from_checkpoint(
            checkpoint, Placement.from_json(placement_json), shard_id, DTYPES[dtype])

    def forward(self, layer: int, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor,
                topk_weights_NK: torch.Tensor) -> torch.Tensor:
        return self.worker.forward(layer, x_ND, topk_ids_NK, topk_weights_NK)

    def describe(self) -> dict:
        """Where this shard runs and what it holds (tests assert node ids from this)."""
        return {"shard_id": self.worker.shard_id,
                "node_id": ray.get_runtime_context().get_node_id(),
                "experts": self.worker.expert_ids(),
                "num_parameters": self.worker.num_parameters()}
