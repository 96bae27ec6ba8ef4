"""Test harness: a real local multi-node cluster started with `moe-serve up`, stopped by PID.

Loopback only (127.0.0.1). `down` kills every process `up` started; `assert_stopped` checks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from serving.launcher import _descendants, pid_alive, read_state
from serving.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def moe_serve(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"moe-serve {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def running_cluster(checkpoint: Path, state_dir: Path, *, shards: int, nodes: int = 2, config: Path | None = None,
                    extra: tuple[str, ...] = ()):
    """`moe-serve up` with these flags (and `extra` ones); yields its state, then `down`, then checks
    that every process it started (those alive once it was up) is gone. $MOE_TEST_GRPC_INGRESS
    (proxy | haproxy) picks `--grpc-ingress` for the clusters that do not pick one themselves, to run
    the cluster tests through HAProxy (default: the launcher's, proxy)."""
    ingress = os.environ.get("MOE_TEST_GRPC_INGRESS")
    if ingress and "--grpc-ingress" not in extra:
        extra = (*extra, "--grpc-ingress", ingress)
    grpc_port, metrics_port = free_port(), free_port()
    state = None
    try:
        moe_serve("up", "--checkpoint", str(checkpoint), "--expert-shards", str(shards), "--nodes", str(nodes),
                  "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                  "--state-dir", str(state_dir), *(["--config", str(config)] if config else []), *extra,
                  timeout=600)
        state = read_state(state_dir)
        state["pids_at_start"] = _descendants([state["pid"], *state["ray_pids"]])
        state["state_dir"] = str(state_dir)
        yield state
    finally:
        moe_serve("down", "--state-dir", str(state_dir), timeout=120, check=False)
        if state is not None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(pid_alive(p) for p in state["pids_at_start"]):
                time.sleep(0.2)
            left = [p for p in state["pids_at_start"] if pid_alive(p)]
            assert not left, f"processes left running after down: {left}"


LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")   # ss's spelling of a loopback address


def listening_addresses(port: int) -> set[str]:
    """The local addresses listening on TCP `port` (`ss`), e.g. {"127.0.0.1:9500"} or {"*:9500"}."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines()}


def ray_query(state: dict, code: str, timeout: float = 120) -> dict:
    """Run `code` in a driver attached to the cluster; it must print one JSON object."""
    script = ("import json, ray\nfrom ray import serve\n"
              f"ray.init(address={state['gcs_address']!r}, logging_level='ERROR')\n" + code)
    env = {**os.environ, "RAY_TMPDIR": state["ray_tmp"],
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise AssertionError(f"ray query failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_after_placement(state: dict, version: int, timeout_s: float = 30) -> dict:
    """The EngineReplica's `ready` info once it routes by placement `version` or later (or when
    `timeout_s` has passed: the caller asserts on `placement_version`)."""
    return ray_query(state, f"""
import time
deadline = time.monotonic() + {timeout_s}
while time.monotonic() < deadline:
    engine = serve.get_deployment_handle("EngineReplica", app_name="moe").ready.remote().result()
    if engine["placement_version"] >= {version}:
        break
    time.sleep(0.5)
print(json.dumps(engine))
""")
