"""HAProxy's admin frontends (stats page, Prometheus exporter) bind where its serving frontends bind
(serving/deployments/haproxy_admin.py): rendered by Ray's own config writer, checked by the haproxy
binary that ray[serve] installs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from ray.serve._private import haproxy
from ray.serve.config import HTTPOptions, gRPCOptions

from serving.deployments import haproxy_admin, worker_setup

REPO = Path(__file__).resolve().parent.parent


def _binds(tmp_path, host: str) -> dict[str, str]:
    """Ray's HAProxy config for a node serving on `host`: section name -> the address of its bind."""
    cfg = haproxy.HAProxyConfig(http_options=HTTPOptions(host=host, port=28123),
                                grpc_options=gRPCOptions(port=28124, grpc_servicer_functions=["x.add_Servicer"]),
                                socket_path=str(tmp_path / "admin.sock"), stats_port=28125, metrics_port=28126,
                                metrics_socket_path=str(tmp_path / "metrics.sock"))
    api = haproxy.HAProxyApi(cfg, config_file_path=str(tmp_path / "haproxy.cfg"))
    api._generate_config_file_internal()
    text = (tmp_path / "haproxy.cfg").read_text()
    binds, section = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace():
            section = line.strip()
        elif (m := re.match(r"\s+bind (\S+)", line)):
            binds[section] = m.group(1)
    return binds


@pytest.fixture
def ray_template(monkeypatch):
    """Ray's template as shipped; put back after the test (the rewrite changes a module constant)."""
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", haproxy.HAPROXY_CONFIG_TEMPLATE)


def test_rays_template_binds_the_admin_frontends_on_every_interface(tmp_path, ray_template):
    binds = _binds(tmp_path, "127.0.0.1")
    assert binds["frontend http_frontend"] == "127.0.0.1:28123"
    assert binds["listen stats"] == "*:28125" and binds["frontend prometheus"] == ":28126"


@pytest.mark.parametrize("host, bound", [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "*")])
def test_the_admin_frontends_follow_the_serving_host(tmp_path, ray_template, host, bound):
    assert haproxy_admin.bind_admin_to_frontend_host()
    assert haproxy_admin.bind_admin_to_frontend_host()          # a second rewrite changes nothing
    binds = _binds(tmp_path, host)
    assert binds["listen stats"] == f"{bound}:28125"
    assert binds["frontend prometheus"] == f"{bound}:28126"
    assert binds["frontend http_frontend"] == f"{bound}:28123"
    check = subprocess.run([haproxy.get_haproxy_binary(), "-c", "-f", str(tmp_path / "haproxy.cfg")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_unknown_template_is_left_as_it_is(ray_template, caplog):
    haproxy.HAPROXY_CONFIG_TEMPLATE = "listen stats\n  bind 10.0.0.1:{{ config.stats_port }}\n"
    assert haproxy_admin.rebind_admin(haproxy.HAPROXY_CONFIG_TEMPLATE) is None
    assert not haproxy_admin.bind_admin_to_frontend_host()
    assert haproxy.HAPROXY_CONFIG_TEMPLATE == "listen stats\n  bind 10.0.0.1:{{ config.stats_port }}\n"
    assert "keep Ray's binds" in caplog.text


def test_the_worker_setup_rebinds_only_in_haproxy_mode(ray_template, monkeypatch):
    shipped = haproxy.HAPROXY_CONFIG_TEMPLATE
    monkeypatch.setattr(worker_setup.startup_priority, "boost", lambda: False)
    monkeypatch.delenv(worker_setup.HAPROXY_MODE_VAR, raising=False)
    worker_setup.setup()
    assert haproxy.HAPROXY_CONFIG_TEMPLATE == shipped
    monkeypatch.setenv(worker_setup.HAPROXY_MODE_VAR, "1")
    worker_setup.setup()
    assert haproxy.HAPROXY_CONFIG_TEMPLATE == haproxy_admin.rebind_admin(shipped) != shipped


def test_a_worker_without_ray_serve_rewrites_the_template_when_it_imports_it():
    """The setup hook of a worker that has not imported Ray Serve (an expert shard's actor) does
    not import it; the HAProxy module is rewritten if and when it is imported."""
    code = """
import sys
from serving.deployments import haproxy_admin, on_import, worker_setup
worker_setup.startup_priority.boost = lambda: False
import os; os.environ[worker_setup.HAPROXY_MODE_VAR] = "1"
worker_setup.setup()
worker_setup.setup()                                  # installs its import hook once
assert "ray.serve" not in sys.modules, "the hook imported Ray Serve"
assert on_import.waiting(haproxy_admin.HAPROXY_MODULE) == 1
from ray.serve._private import haproxy
assert haproxy.HAPROXY_CONFIG_TEMPLATE.count("bind {{ config.frontend_host }}:{{ config.stats_port }}") == 1
assert haproxy.HAPROXY_CONFIG_TEMPLATE.count("bind {{ config.frontend_host }}:{{ config.metrics_port }}") == 1
assert on_import.waiting(haproxy_admin.HAPROXY_MODULE) == 0
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
