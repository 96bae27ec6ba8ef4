"""Ray Serve's gRPC servers bind the serving host, as its HTTP servers do.

Ray Serve 2.60 starts each of its gRPC servers through `grpc_util.start_grpc_server`, which binds
`[::]:PORT`: every interface, IPv4 and IPv6, whatever `http_options.host` says. Those servers all
answer our API: the app's gRPC port itself (the gRPC proxy actor, `--grpc-ingress proxy`), and in
HAProxy mode the fallback proxy's port (9500) and each ingress replica's direct-ingress port
(40000-41000), which HAProxy reaches at `http_options.host`. Its HTTP servers bind that host
(127.0.0.1 in cluster/serve_config.yaml), so a cluster meant to serve this machine alone answered
gRPC on every interface.

`bind_grpc_to_serving_host` wraps `default_impl.add_grpc_address`, the function start_grpc_server
looks up each time it starts a server, so that `[::]:PORT` becomes HOST:PORT, HOST being
$MOE_SERVE_GRPC_HOST: `moe-serve up` sets it to `http_options.host` for every Ray process of the
cluster (serving/launcher.py) and every worker's setup hook applies it
(serving/deployments/worker_setup.py). A host meaning every interface (0.0.0.0, ::) keeps Ray's
bind, as does a worker without the variable (a KubeRay pod serves on 0.0.0.0). The module is
patched where a worker imports it, not before (serving/deployments/on_import.py).

Not covered: Ray Serve's inter-deployment gRPC server (a replica's `[::]:0`, which handles on other
nodes reach at the node's address) and the ports of Ray's own daemons and workers.
"""
from __future__ import annotations

import logging
import os

from serving.deployments.on_import import when_imported

log = logging.getLogger(__name__)

GRPC_HOST_VAR = "MOE_SERVE_GRPC_HOST"              # the host Ray Serve's gRPC servers bind
DEFAULT_IMPL_MODULE = "ray.serve._private.default_impl"
RAY_BIND = "[::]:"                                  # how start_grpc_server spells every interface
EVERY_INTERFACE = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def bound_address(address: str, host: str) -> str:
    """Ray's gRPC bind address `address` on `host` instead of every interface; any other address,
    or a host meaning every interface, as it is. An IPv6 host gets its brackets."""
    if not address.startswith(RAY_BIND) or host in EVERY_INTERFACE:
        return address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{address[len(RAY_BIND):]}"


def serving_host() -> str:
    """The host this process's Ray Serve gRPC servers should bind ("" where nothing is set)."""
    return os.environ.get(GRPC_HOST_VAR, "").strip()


def bind_grpc_to_serving_host() -> bool | None:
    """Patch this process's Ray Serve (see the module doc): now if its module is loaded (True if its
    gRPC servers will bind the serving host, False if the module is not one this code knows), else
    when it is imported (None)."""
    return when_imported(DEFAULT_IMPL_MODULE, _patch)


def _patch(module) -> bool:
    ray_add = getattr(module, "add_grpc_address", None)
    if ray_add is None:
        log.warning("Ray Serve has no default_impl.add_grpc_address: its gRPC servers keep Ray's binds")
        return False
    if getattr(ray_add, "binds_serving_host", False):
        return True                                  # patched already

    def add_grpc_address(grpc_server, server_address: str):
        return ray_add(grpc_server, bound_address(server_address, serving_host()))

    add_grpc_address.binds_serving_host = True
    add_grpc_address.__doc__ = ray_add.__doc__
    module.add_grpc_address = add_grpc_address
    return True
