"""What every Ray worker of a cluster we start runs first: the `worker_process_setup_hook` of the
job's runtime_env (`moe-serve up`, the in-process bench's local cluster) and of the app's (KubeRay
manifests, where it reaches the replicas).

1. `startup_priority.boost`: the worker imports Ray Serve and torch at nice 0, ahead of busy
   replicas (serving/deployments/startup_priority.py);
2. where `moe-serve up` names the serving host ($MOE_SERVE_GRPC_HOST, `http_options.host`),
   `grpc_bind.bind_grpc_to_serving_host`: Ray Serve's gRPC servers bind that host, not every
   interface (serving/deployments/grpc_bind.py);
3. in Ray Serve's HAProxy mode, `haproxy_admin.bind_admin_to_frontend_host`: HAProxy's stats page
   and Prometheus exporter bind where its serving frontends bind (serving/deployments/haproxy_admin.py).
"""
from __future__ import annotations

import os

from serving.deployments import grpc_bind, startup_priority

SETUP_HOOK = "serving.deployments.worker_setup.setup"
HAPROXY_MODE_VAR = "RAY_SERVE_ENABLE_HA_PROXY"      # Ray Serve's HAProxy mode (launcher.HAPROXY_MODE_ENV sets it)


def worker_runtime_env() -> dict:
    """The runtime_env under which every Ray worker of our clusters starts: `setup` first. A fresh
    dict each call: `ray.init` adds keys to the one it is given."""
    return {"worker_process_setup_hook": SETUP_HOOK}


def setup() -> None:
    startup_priority.boost()
    if grpc_bind.serving_host() not in grpc_bind.EVERY_INTERFACE:
        grpc_bind.bind_grpc_to_serving_host()
    if os.environ.get(HAPROXY_MODE_VAR) == "1":
        from serving.deployments import haproxy_admin
        haproxy_admin.bind_admin_to_frontend_host()
