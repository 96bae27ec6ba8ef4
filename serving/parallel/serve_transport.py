"""The `serve` transport: each shard is an ExpertShard Serve deployment, called by handle.

Elastic and fault-tolerant (Serve restarts and autoscales shard replicas); every shard of
a step is called at once, then all results are awaited.
"""
from __future__ import annotations

from typing import Sequence

import torch

from serving.parallel.dispatcher import ShardCall


class ServeTransport:
    name = "serve"

    def __init__(self, handles: Sequence):     # DeploymentHandle per shard, index = shard id
        self.handles = list(handles)

    def run(self, layer: int, calls: Sequence[ShardCall]) -> list[torch.Tensor]:
        return self.submit(layer, calls).wait()

    def submit(self, layer: int, calls: Sequence[ShardCall]) -> "ServeResponses":
        return ServeResponses([self.handles[c.shard].forward.remote(layer, c.x_ND, c.topk_ids_NK,
                                                                    c.topk_weights_NK) for c in calls])


class ServeResponses:
    """The shards' responses in flight (DeploymentResponse per call)."""

    def __init__(self, responses: list):
        self.responses = responses

    def wait(self) -> list[torch.Tensor]:
        return [r.result() for r in self.responses]
