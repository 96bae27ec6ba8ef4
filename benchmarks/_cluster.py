"""What the cluster benchmarks (tenant_isolation.py, prefix_routing.py, cold_start.py) share: the demo checkpoint,
a local cluster up for the length of a `with` block (`moe-serve up` with a Serve config, then
`moe-serve down`, whatever happens), and the header every benchmark prints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from serving.ports import free_port  # noqa: E402
from serving.loadgen.stats import command_line, machine_info  # noqa: E402

CLI = [sys.executable, "-m", "serving.cli"]
DEMO_CHECKPOINT = REPO / "checkpoints" / "demo-mixtral-small"


@dataclass(frozen=True)
class Cluster:
    target: str           # HOST:PORT of gRPC
    metrics_url: str
    env: dict


def ensure_checkpoint(path: str | Path) -> None:
    """The `small` Mixtral demo checkpoint at `path`, written (seeded) if it is not there."""
    if not Path(path).is_dir():
        subprocess.run([*CLI, "checkpoint", "--family", "mixtral", "--size", "small", "--out", str(path)],
                       check=True, cwd=REPO)


def header() -> dict:
    """The command as typed and the machine it runs on (every benchmark prints and saves them)."""
    return {"command": command_line(), "machine": machine_info()}


def print_header() -> dict:
    h = header()
    print("command :", h["command"], flush=True)
    print("machine :", json.dumps(h["machine"]), flush=True)
    return h


@contextmanager
def local_cluster(checkpoint: str, config: Path, state_dir: Path, *, expert_shards: int = 2, nodes: int = 2,
                  extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """`moe-serve up` on loopback ports with this Serve config (and `env` added to the environment its
    processes inherit); `moe-serve down` on the way out."""
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    subprocess.run([*CLI, "up", "--checkpoint", checkpoint, "--expert-shards", str(expert_shards),
                    "--nodes", str(nodes), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                    "--state-dir", str(state_dir), "--config", str(config), *extra],
                   check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
    try:
        yield Cluster(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", env)
    finally:
        subprocess.run([*CLI, "down", "--state-dir", str(state_dir)], cwd=REPO, env=env, capture_output=True,
                       timeout=180)
