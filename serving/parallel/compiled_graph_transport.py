"""Ray Compiled Graphs as an expert transport: a candidate of issue 4, measured by
`benchmarks/dispatch_bench.py --transports compiled`, not one the cluster serves with.

The shards are S plain Ray actors (`CompiledShard`, each holding an ExpertShardWorker, shard s on
node s mod N as the other transports place them). One compiled graph, built once, sends every MoE
layer's calls to all S actors at once and gathers their partial sums:

    InputNode -> (inp[0] -> shard 0.forward, ..., inp[S-1] -> shard S-1.forward) -> MultiOutputNode

`run` executes it with one argument per shard: (layer, x_ND, topk_ids_NK, topk_weights_NK), or
None for a shard that gets no tokens this layer (a compiled graph runs every node each time, so
such a shard is still woken, and answers None). Ray moves the arguments and results over its
shared-memory channels (on one machine; across machines Ray pushes them), with no task
submission per call. On CPU there is no NCCL: torch tensors are serialized into the channel.

Why it is not a serving transport: see the README's dispatch micro-benchmark (the measured hop
against the `collective` transport). It also has no fault handling: a dead actor fails the graph.
"""
from __future__ import annotations

from typing import Sequence

import ray
import torch

from serving.parallel.dispatcher import ShardCall
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement

BUFFER_BYTES = 1 << 21          # a channel's first buffer; Ray grows it for a larger message


@ray.remote
class CompiledShard:
    """One expert shard behind a compiled graph node."""

    def __init__(self, checkpoint: str, placement_json: str, shard_id: int, dtype: torch.dtype):
        torch.set_num_threads(1)
        self.worker = ExpertShardWorker.from_checkpoint(checkpoint, Placement.from_json(placement_json),
                                                        shard_id, dtype)

    def forward(self, call: tuple | None) -> torch.Tensor | None:
        if call is None:
            return None
        layer, x_ND, topk_ids_NK, topk_weights_NK = call
        return self.worker.forward(layer, x_ND, topk_ids_NK, topk_weights_NK)


class CompiledGraphTransport:
    """S CompiledShard actors behind one compiled graph (module doc); close() tears both down."""
    name = "compiled"

    def __init__(self, checkpoint: str, placement: Placement, dtype: torch.dtype,
                 shard_resources: Sequence[dict[str, float]], num_cpus: float = 0.1):
        from ray.dag import InputNode, MultiOutputNode
        self.num_shards = placement.num_shards
        self.actors = [CompiledShard.options(num_cpus=num_cpus, resources=shard_resources[s]).remote(
            checkpoint, placement.to_json(), s, dtype) for s in range(self.num_shards)]
        ray.get([a.__ray_ready__.remote() for a in self.actors])
        with InputNode() as inp:
            dag = MultiOutputNode([a.forward.bind(inp[s]) for s, a in enumerate(self.actors)])
        self.graph = dag.experimental_compile(_buffer_size_bytes=BUFFER_BYTES)

    def run(self, layer: int, calls: Sequence[ShardCall]) -> list[torch.Tensor]:
        args: list[tuple | None] = [None] * self.num_shards
        for c in calls:
            args[c.shard] = (layer, c.x_ND, c.topk_ids_NK, c.topk_weights_NK)
        outs = ray.get(self.graph.execute(*args))
        return [outs[c.shard] for c in calls]

    def close(self) -> None:
        """Tear the graph down and kill the shard actors (again: nothing)."""
        graph, actors, self.graph, self.actors = self.graph, self.actors, None, []
        try:
            if graph is not None:
                graph.teardown()
        finally:
            for a in actors:
                ray.kill(a)
