"""A private local Ray cluster of N nodes on this machine, for benchmarks and tests.

Node i carries the custom resource `node_resource(i)`, so actors are placed on a chosen node the
way `moe-serve up` places them. Ray's files go to a temp dir of our own (RAY_TMPDIR; never
/tmp/ray), the driver joins with `address=` this cluster's GCS (never a stranger's), and on exit
every process the nodes started is stopped, then killed by PID if it is still alive.
`moe-serve up` (serving/launcher.py) starts its cluster itself: it also keeps a state file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def local_ray_cluster(nodes: int, runtime_env: dict | None = None) -> Iterator[dict[int, str]]:
    """Start `nodes` Ray nodes (1 CPU each) and connect this process as the driver.
    Yields node index -> Ray node id."""
    import ray
    from ray.cluster_utils import Cluster

    from serving.deployments.config import node_resource
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    tmp = Path(tempfile.mkdtemp(prefix="mlr-", dir="/tmp"))        # short: unix socket paths
    (tmp / "ray").mkdir()
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "PYTHONPATH")}
    os.environ["RAY_TMPDIR"] = str(tmp)
    # workers import serving.* from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    cluster, pids = None, set()
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, resources={node_resource(0): 1}, include_dashboard=False))
        for i in range(1, nodes):
            cluster.add_node(num_cpus=1, resources={node_resource(i): 1})
        pids = {p.process.pid for node in cluster.list_all_nodes()
                for procs in node.all_processes.values() for p in procs}
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False, runtime_env=runtime_env)
        yield {i: n["NodeID"] for n in ray.nodes() if n["Alive"]
               for i in range(nodes) if node_resource(i) in n["Resources"]}
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for pid in pids:                      # still alive, and still a Ray process (not a reused PID)
            with contextlib.suppress(OSError):
                if "ray" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
