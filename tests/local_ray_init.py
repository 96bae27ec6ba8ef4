"""`ray.init(address="local", ...)` for the tests that want a plain one-node Ray of their own, with
one retry: on this 2-core machine Ray's own start-up has failed now and then with "The current
node timed out during startup" (the GCS up, the raylet never registering within Ray's fixed 30 s;
seen once each in test_ray_adapter and test_api_ray_proxy across many CI runs). A second, fresh
start is not a second chance for our code: nothing of ours has run yet."""
from __future__ import annotations

import shutil
import tempfile

ATTEMPTS = 2


def init_local_ray(**kwargs) -> str:
    """Start a private local Ray (loopback, a temp dir of its own) and connect; returns the temp dir."""
    import ray
    for attempt in range(ATTEMPTS):
        ray_tmp = tempfile.mkdtemp(prefix="moe-t-")        # short: Ray's socket paths live under it
        try:
            ray.init(address="local", _node_ip_address="127.0.0.1", _temp_dir=ray_tmp, **kwargs)
            return ray_tmp
        except Exception as exc:                           # noqa: BLE001 - Ray raises a bare Exception here
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
            if attempt == ATTEMPTS - 1 or "timed out during startup" not in str(exc):
                raise
    raise AssertionError("unreachable")
