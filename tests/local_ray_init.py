"""`ray.init(address="local", ...)` for the tests that want a plain one-node Ray of their own, with
one retry: on this 2-core machine Ray's own start-up has failed now and then, with "The current
node timed out during startup" (the GCS up, the raylet never registering within Ray's fixed 30 s;
seen once each in test_ray_adapter and test_api_ray_proxy across many CI runs) or "Timed out
waiting for file .../gcs_server_port_..." (the GCS not bound within Ray's default 30 s: once in
test_ray_adapter, CI of 7ab86c6). The GCS gets 90 s here, and a failed start's processes are killed
by PID before the second, fresh start, which is not a second chance for our code: nothing of ours
has run yet."""
from __future__ import annotations

import os
import shutil
import tempfile

ATTEMPTS = 2
GCS_PORT_WAIT_S = "90"          # RAY_gcs_server_port_wait_time_s (Ray's default: 30)
STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def init_local_ray(**kwargs) -> str:
    """Start a private local Ray (loopback, a temp dir of its own) and connect; returns the temp dir."""
    import ray
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", GCS_PORT_WAIT_S)
    for attempt in range(ATTEMPTS):
        ray_tmp = tempfile.mkdtemp(prefix="moe-t-")        # short: Ray's socket paths live under it
        try:
            ray.init(address="local", _node_ip_address="127.0.0.1", _temp_dir=ray_tmp, **kwargs)
            return ray_tmp
        except Exception as exc:                           # noqa: BLE001 - Ray raises a bare Exception here
            ray.shutdown()
            _kill_processes_under(ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
            if attempt == ATTEMPTS - 1 or not any(s in str(exc) for s in STARTUP_TIMEOUTS):
                raise
    raise AssertionError("unreachable")


def _kill_processes_under(ray_tmp: str, wait_s: float = 10.0) -> None:
    """Kill, by PID, the processes a failed start left (their command lines name its temp dir:
    Ray's daemons take their session paths as arguments)."""
    import psutil
    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and any(ray_tmp in arg for arg in (p.info["cmdline"] or ())):
            mine.append(p)
    for p in mine:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=wait_s)
