"""Ray Serve's gRPC servers bind the serving host, not every interface (serving/deployments/grpc_bind.py),
checked on Ray's own `start_grpc_server` and the sockets it leaves listening; and the import hook
that patches a module where a worker loads it (serving/deployments/on_import.py)."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from ray.serve._private import default_impl
from ray.serve._private.grpc_util import start_grpc_server
from ray.serve.config import gRPCOptions

from cluster_harness import listening_addresses
from serving.deployments import grpc_bind, on_import, worker_setup
from serving.ports import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("address, host, bound", [
    ("[::]:9500", "127.0.0.1", "127.0.0.1:9500"),
    ("[::]:40000", "::1", "[::1]:40000"),
    ("[::]:40000", "[::1]", "[::1]:40000"),
    ("[::]:9500", "0.0.0.0", "[::]:9500"),         # every interface: Ray's bind stays
    ("[::]:9500", "::", "[::]:9500"),
    ("[::]:9500", "", "[::]:9500"),                # no host named
    ("10.1.2.3:9500", "127.0.0.1", "10.1.2.3:9500"),   # an address Ray chose otherwise is left alone
])
def test_bound_address(address, host, bound):
    assert grpc_bind.bound_address(address, host) == bound


def _start_and_list(port: int) -> set[str]:
    """Start a gRPC server with Ray Serve's own `start_grpc_server`, as its proxy and direct-ingress
    replicas do; the addresses it listens on; stop it."""
    async def run() -> set[str]:
        task, server = await start_grpc_server(lambda **kw: None, gRPCOptions(port=port),
                                               event_loop=asyncio.get_running_loop())
        try:
            return listening_addresses(port)
        finally:
            await server.stop(0)
            task.cancel()
    return asyncio.run(asyncio.wait_for(run(), timeout=30))


@pytest.fixture
def rays_add_grpc_address(monkeypatch):
    """Ray's function as shipped; put back after the test (the patch replaces a module attribute)."""
    monkeypatch.setattr(default_impl, "add_grpc_address", default_impl.add_grpc_address)


def test_rays_grpc_servers_listen_on_every_interface(rays_add_grpc_address, monkeypatch):
    monkeypatch.setenv(grpc_bind.GRPC_HOST_VAR, "127.0.0.1")      # not applied: Ray's bind
    port = free_port()
    assert _start_and_list(port) == {f"*:{port}"}


def test_patched_they_listen_on_the_serving_host_only(rays_add_grpc_address, monkeypatch):
    monkeypatch.setenv(grpc_bind.GRPC_HOST_VAR, "127.0.0.1")
    assert grpc_bind.bind_grpc_to_serving_host()
    assert grpc_bind.bind_grpc_to_serving_host()                  # a second patch wraps nothing twice
    port = free_port()
    listening = _start_and_list(port)
    # gRPC binds 127.0.0.1 as an IPv4-mapped address of its dual-stack socket: loopback either way
    assert listening and listening <= {f"127.0.0.1:{port}", f"[::ffff:127.0.0.1]:{port}"}, listening
    monkeypatch.setenv(grpc_bind.GRPC_HOST_VAR, "0.0.0.0")        # read when a server starts
    port = free_port()
    assert _start_and_list(port) == {f"*:{port}"}


def test_the_worker_setup_patches_only_where_a_host_is_named(rays_add_grpc_address, monkeypatch):
    shipped = default_impl.add_grpc_address
    monkeypatch.setattr(worker_setup.startup_priority, "boost", lambda: False)
    monkeypatch.delenv(worker_setup.HAPROXY_MODE_VAR, raising=False)
    for host in (None, "0.0.0.0", "::"):
        if host is None:
            monkeypatch.delenv(grpc_bind.GRPC_HOST_VAR, raising=False)
        else:
            monkeypatch.setenv(grpc_bind.GRPC_HOST_VAR, host)
        worker_setup.setup()
        assert default_impl.add_grpc_address is shipped, host
    monkeypatch.setenv(grpc_bind.GRPC_HOST_VAR, "127.0.0.1")
    worker_setup.setup()
    assert default_impl.add_grpc_address is not shipped and default_impl.add_grpc_address.binds_serving_host


def test_the_launcher_passes_the_http_host():
    from serving.launcher import serving_host_env
    assert serving_host_env({"http_options": {"host": "127.0.0.1", "port": 1}}) == {grpc_bind.GRPC_HOST_VAR: "127.0.0.1"}
    assert serving_host_env({"http_options": {"port": 1}}) == {}


def test_a_worker_without_ray_serve_is_patched_when_it_imports_it():
    """The setup hook of a worker that has not imported Ray Serve (an expert shard's actor) does not
    import it; Ray Serve's gRPC helper is patched if and when it is imported."""
    code = """
import os, sys
from serving.deployments import grpc_bind, on_import, worker_setup
worker_setup.startup_priority.boost = lambda: False
os.environ[grpc_bind.GRPC_HOST_VAR] = "127.0.0.1"
worker_setup.setup()
worker_setup.setup()                                  # waits once
assert "ray.serve" not in sys.modules, "the hook imported Ray Serve"
assert on_import.waiting(grpc_bind.DEFAULT_IMPL_MODULE) == 1
from ray.serve._private import default_impl
assert default_impl.add_grpc_address.binds_serving_host
assert on_import.waiting(grpc_bind.DEFAULT_IMPL_MODULE) == 0
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_when_imported_runs_now_or_once_after_the_import(tmp_path, monkeypatch):
    (tmp_path / "moe_probe_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "moe_probe_module", raising=False)
    seen = []

    def patch(module):
        seen.append(module.VALUE)         # runs after the module's code: its names are there
        module.VALUE += 1
        return "patched"

    assert on_import.when_imported("moe_probe_module", patch) is None
    assert on_import.when_imported("moe_probe_module", patch) is None     # the same patch waits once
    assert on_import.waiting("moe_probe_module") == 1 and seen == []
    import moe_probe_module
    assert seen == [1] and moe_probe_module.VALUE == 2
    assert on_import.waiting("moe_probe_module") == 0
    assert on_import.when_imported("moe_probe_module", patch) == "patched"   # loaded: now
    assert seen == [1, 2]
