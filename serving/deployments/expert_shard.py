"""ExpertShard deployment: a shim around ExpertShardWorker (one deployment per shard)."""
from __future__ import annotations

import dataclasses
import os
import threading
import time

from serving.deployments import startup_priority

startup_priority.boost()   # before torch: a replica starting mid-spike imports ahead of the busy ones

import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve

from serving.autoscaling.signals import shard_autoscaling_stats
from serving.deployments.placement_sync import PlacementWatcher
from serving.engine.host_allocator import tune_host_allocator
from serving.engine.load_window import LoadWindow
from serving.model.linear import warm_up
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement
from serving.thread_priority import compute_policy, raise_priority, thread_nice, thread_policy


RETAIN_GRACE_S = 5.0


@serve.deployment
class ExpertShard:
    def __init__(self, checkpoint: str, placement_json: str, shard_id: int, dtype: str,
                 compute_nice: int | None = None, warm_rows: int = 0):
        from serving.deployments.config import DTYPES
        torch.set_num_threads(1)
        tune_host_allocator()
        self.worker = ExpertShardWorker.from_checkpoint(
            checkpoint, Placement.from_json(placement_json), shard_id, DTYPES[dtype])
        # the GEMM kernels of up to `warm_rows` rows (the engine's tokens per step), built before the
        # replica is ready. Serve runs this constructor on the thread `forward` runs on (oneDNN keys a
        # kernel by the OpenMP threads of the calling thread): serving/model/linear.py
        self.kernel_warm_up = warm_up(self.worker.warm_targets(warm_rows))
        self.load = LoadWindow()
        self.placement_watcher = PlacementWatcher(self._on_placement)
        startup_priority.restore()               # ready: back to the workers' niceness
        self.compute_nice = compute_nice         # ... except the thread that runs forward (on first call)
        self.forward_tid: int | None = None

    def _on_placement(self, placement: Placement) -> None:
        """A rebalance: new experts load on first use; drop the ones taken away, once the
        engines (which poll at the same rate) have surely switched."""
        time.sleep(RETAIN_GRACE_S)
        self.worker.retain(placement.experts_of(self.worker.shard_id))

    async def forward(self, layer: int, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor,
                      topk_weights_NK: torch.Tensor) -> torch.Tensor:
        # async on purpose: Serve runs it on the replica's loop, skipping the thread-pool hop a sync
        # method takes (the shard does nothing else; the computation is short and one at a time).
        if self.forward_tid is None:             # the replica's loop thread: ahead of Ray's streaming
            self.forward_tid = threading.get_native_id()   # threads (serving/thread_priority.py)
            raise_priority(self.compute_nice)
            compute_policy()
        t0 = time.perf_counter()
        y_ND = self.worker.forward(layer, x_ND, topk_ids_NK, topk_weights_NK)
        self.load.add("busy_s", time.perf_counter() - t0)
        self.load.add("tokens", x_ND.shape[0])
        return y_ND

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-autoscaling hook: the token load on this shard replica."""
        return shard_autoscaling_stats(tokens_per_s=self.load.rate("tokens"),
                                       busy_fraction=min(1.0, self.load.rate("busy_s")))

    def describe(self) -> dict:
        """Where this shard runs and what it holds (tests assert node ids from this)."""
        return {"shard_id": self.worker.shard_id,
                "node_id": ray.get_runtime_context().get_node_id(),
                "experts": self.worker.expert_ids(),
                "experts_loaded_since_start": self.worker.loads_total,
                "kernel_warm_up": dataclasses.asdict(self.kernel_warm_up),
                "num_parameters": self.worker.num_parameters(),
                "forward_thread_nice": thread_nice(self.forward_tid) if self.forward_tid else None,
                "forward_thread_policy": thread_policy(self.forward_tid) if self.forward_tid else None,
                "process_policy": thread_policy(os.getpid())}
