"""The bare hop of a MoE layer as plain Ray actor tasks: the floor under any transport that makes
one Ray task per shard per layer (Ray's tensor transport included: it changes how a task's
tensors move, not that there is a task). Two echo actors on a private 2-node local Ray cluster
(one a node); each timed call sends a layer's x_TD (hidden 512, fp32), topk_ids_TK and
topk_weights_TK to both and gets zeros of x's shape back. 10 warm-up and 50 timed calls a size.

    .venv/bin/python benchmarks/actor_task_hop.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from serving.deployments.config import node_resource  # noqa: E402
from serving.loadgen.stats import command_line, machine_info  # noqa: E402
from serving.local_ray import local_ray_cluster  # noqa: E402

HIDDEN, TOP_K, SHARDS = 512, 2, 2


@ray.remote(num_cpus=0.1)
class Echo:
    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_TD)


def main() -> int:
    print(f"command  {command_line()}\nmachine  {machine_info()['cpu_model']}", flush=True)
    with local_ray_cluster(SHARDS):
        actors = [Echo.options(resources={node_resource(s): 0.001}).remote() for s in range(SHARDS)]
        ray.get([a.__ray_ready__.remote() for a in actors])
        for T in (1, 64, 256):
            x_TD = torch.randn(T, HIDDEN)
            ids_TK, w_TK = torch.zeros(T, TOP_K, dtype=torch.int64), torch.rand(T, TOP_K)
            times = []
            for _ in range(60):
                t0 = time.perf_counter()
                ray.get([a.forward.remote(x_TD, ids_TK, w_TK) for a in actors])
                times.append(time.perf_counter() - t0)
            times = times[10:]
            print(f"plain actor tasks, {T} tokens x {SHARDS} shards: p50 {np.percentile(times, 50) * 1e3:.2f} ms, "
                  f"p90 {np.percentile(times, 90) * 1e3:.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
