"""`moe-serve run` (what `make run` calls) end to end: a real 2-node cluster on a written checkpoint,
the demo completion streamed over gRPC on loopback, then SIGTERM (a supervisor's stop) takes the
whole cluster down, every process it started gone by PID."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cluster_harness import REPO
from serving.launcher import _descendants, pid_alive, read_state
from serving.ports import free_port
from serving.model.checkpoint import write_checkpoint

pytestmark = pytest.mark.cluster


def test_run_streams_the_demo_then_stops_everything_on_sigterm(tmp_path):
    ckpt = write_checkpoint("mixtral", "tiny", tmp_path / "ckpt")
    state_dir = tmp_path / "state"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "run", "--checkpoint", str(ckpt),
                             "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
                             "--state-dir", str(state_dir), "--max-tokens", "8"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            log.seek(0)
            if "Ctrl-C stops everything." in log.read():
                break
            time.sleep(0.5)
        log.seek(0)
        out = log.read()
        assert "Ctrl-C stops everything." in out, out[-3000:]
        assert "[finish_reason=length usage: prompt=" in out and "completion=8]" in out
        state = read_state(state_dir)
        pids = _descendants([state["pid"], *state["ray_pids"]])
        assert len(pids) > 3                                  # the host, Ray's nodes and their workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        log.seek(0)
        assert "stopping ..." in log.read()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.2)
        assert not [p for p in pids if pid_alive(p)], "processes left running after SIGTERM"
        assert read_state(state_dir)["status"] == "stopped"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([sys.executable, "-m", "serving.cli", "down", "--state-dir", str(state_dir)],
                       cwd=REPO, env=env, capture_output=True, timeout=120)
        for p in pids:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)
