"""HAProxy's admin frontends bind where its serving frontends bind.

In Ray Serve's HAProxy mode (`moe-serve up --grpc-ingress haproxy`) each node's HAProxyManager
renders HAProxy's config from Ray's template: the HTTP and gRPC frontends bind
`http_options.host` (127.0.0.1 in cluster/serve_config.yaml), but the stats page (`listen stats`,
`bind *:PORT`, no auth, it lists every backend server's address and state) and the Prometheus
exporter (`frontend prometheus`, `bind :PORT`) bind every interface, whatever that host is.
`bind_admin_to_frontend_host` rewrites those two bind lines of the template to the serving
frontends' host, `{{ config.frontend_host }}` (Ray's own property: `*` when the host is 0.0.0.0 or
::, so a cluster serving on every interface, such as a KubeRay pod's, keeps them there for its
scrapers). It runs in every Ray worker of a cluster we start (serving/deployments/worker_setup.py)
before the HAProxyManager renders a config; Ray reads the template at each render. A worker that has
not imported Ray Serve's HAProxy module rewrites it when it does, not before
(serving/deployments/on_import.py).

The template is a private constant of the pinned Ray (pyproject.toml): if its bind lines are not
the ones below (another Ray), nothing is changed and a warning is logged.
"""
from __future__ import annotations

import logging

from serving.deployments.on_import import when_imported

log = logging.getLogger(__name__)

HAPROXY_MODULE = "ray.serve._private.haproxy"
#: Ray 2.60's bind lines of the two admin frontends -> the same frontend on the serving host
ADMIN_BINDS = {
    "    bind :{{ config.metrics_port }}\n": "    bind {{ config.frontend_host }}:{{ config.metrics_port }}\n",
    "  bind *:{{ config.stats_port }}\n": "  bind {{ config.frontend_host }}:{{ config.stats_port }}\n",
}


def rebind_admin(template: str) -> str | None:
    """`template` with both admin frontends bound to the serving host; None if either bind line is
    not there (exactly once) and not already rewritten."""
    out = template
    for old, new in ADMIN_BINDS.items():
        if out.count(new) == 1 and old not in out:
            continue                          # rewritten already
        if out.count(old) != 1:
            return None
        out = out.replace(old, new)
    return out


def bind_admin_to_frontend_host() -> bool | None:
    """Rewrite the HAProxy config template of this process's Ray Serve (see the module doc): now if
    its HAProxy module is loaded (True if the template now binds the admin frontends to the serving
    host, False if it is not one this code knows), else when that module is imported (None)."""
    return when_imported(HAPROXY_MODULE, _rebind)


def _rebind(module) -> bool:
    rebound = rebind_admin(module.HAPROXY_CONFIG_TEMPLATE)
    if rebound is None:
        log.warning("Ray Serve's HAProxy template has no admin bind lines this code knows: its stats "
                    "and Prometheus frontends keep Ray's binds")
        return False
    module.HAPROXY_CONFIG_TEMPLATE = rebound
    return True
