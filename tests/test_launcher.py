"""`moe-serve redeploy` checks what it is asked before it touches the running cluster (no Ray here:
attaching to the cluster is made to fail the test). The redeploy itself runs 20 times in
tests/test_cluster_parity.py."""
from __future__ import annotations

import json
import os

import pytest
import ray
import yaml

from serving.cli import main
from serving.launcher import DEFAULT_CONFIG, read_state, resolve_serve_config
from serving.model.checkpoint import write_checkpoint


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    """A state dir that looks like a ready cluster (its host pid is this process)."""
    ckpt = write_checkpoint("mixtral", "tiny", tmp_path / "ck")              # 4 experts
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    cfg = resolve_serve_config(DEFAULT_CONFIG, checkpoint=str(ckpt), expert_shards=2, nodes=2,
                               grpc_port=1, metrics_port=2, http_port=3)
    (state_dir / "serve_config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    (state_dir / "state.json").write_text(json.dumps(dict(
        status="ready", pid=os.getpid(), nodes=2, ray_tmp=str(tmp_path), gcs_address="127.0.0.1:1",
        grpc_target="127.0.0.1:1", checkpoint=str(ckpt), expert_shards=2, transport="serve", dtype="fp32")))

    def attach(*a, **k):
        raise AssertionError("redeploy attached to the cluster")
    monkeypatch.setattr(ray, "init", attach)
    return ckpt, state_dir


def test_redeploy_rejects_more_shards_than_experts_before_touching_the_cluster(fake_cluster, capsys):
    ckpt, state_dir = fake_cluster
    before = (state_dir / "state.json").read_text()
    assert main(["redeploy", "--state-dir", str(state_dir), "--expert-shards", "5"]) == 1
    assert "--expert-shards must be in 1..4" in capsys.readouterr().err
    assert (state_dir / "state.json").read_text() == before


def test_redeploy_rejects_a_missing_checkpoint(fake_cluster, tmp_path, capsys):
    _, state_dir = fake_cluster
    assert main(["redeploy", "--state-dir", str(state_dir), "--checkpoint", str(tmp_path / "nope")]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_redeploy_needs_a_ready_cluster(tmp_path, capsys):
    assert main(["redeploy", "--state-dir", str(tmp_path)]) == 1
    assert "no ready cluster" in capsys.readouterr().err
    (tmp_path / "state.json").write_text(json.dumps({"status": "stopped", "pid": os.getpid()}))
    assert main(["redeploy", "--state-dir", str(tmp_path)]) == 1
    assert read_state(tmp_path)["status"] == "stopped"


def test_a_valid_redeploy_goes_on_to_attach(fake_cluster, monkeypatch):
    _, state_dir = fake_cluster
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    with pytest.raises(AssertionError, match="attached"):
        main(["redeploy", "--state-dir", str(state_dir), "--expert-shards", "4"])
    assert read_state(state_dir)["expert_shards"] == 2          # nothing recorded until it is deployed
    assert "RAY_TMPDIR" not in os.environ       # the cluster's session dir does not leak into this process


def test_the_shipped_config_routes_every_service_the_app_answers():
    """The Serve config's servicer functions are the ones serving/api/protos.py defines, so the proxy
    routes moe_serving.v1, KServe v2 (inference.GRPCInferenceService) and grpc.health.v1."""
    from serving.api.protos import SERVICER_FUNCTIONS
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert cfg["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS


def test_the_routers_block_must_be_the_engines_kv_block(tmp_path):
    """The shipped config routes engine requests by prefix affinity in KV-block units; a config
    whose kv_block_size moved without the router's block_tokens is refused before any Ray starts."""
    from serving.launcher import resolve_serve_config
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    engine = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "EngineReplica")
    assert engine["request_router_config"]["request_router_class"] == "serving.routing.ray_router:PrefixAffinityRouter"
    flags = dict(checkpoint="ckpt", expert_shards=2, nodes=2, grpc_port=1, metrics_port=2, http_port=3)
    resolve_serve_config(DEFAULT_CONFIG, **flags)                       # as shipped: consistent
    cfg["applications"][0]["args"]["kv_block_size"] = 32
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="block_tokens .16. must equal args.kv_block_size .32."):
        resolve_serve_config(path, **flags)


@pytest.mark.parametrize("ingress,kept", [("engine", False), ("deployment", True)])
def test_behind_haproxy_the_ingress_deployment_has_no_custom_router(tmp_path, ingress, kept):
    """Ray refuses to deploy a custom request router on the ingress deployment in HAProxy mode (it
    would be bypassed): with the EngineReplica as the ingress its router goes; behind an Ingress
    deployment the EngineReplica is called through a handle, whose router stays."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["applications"][0]["args"]["ingress"] = ingress
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    flags = dict(checkpoint="ckpt", expert_shards=2, nodes=2, grpc_port=1, metrics_port=2, http_port=3)

    def engine(grpc_ingress):
        out = resolve_serve_config(path, **flags, grpc_ingress=grpc_ingress)
        return next(d for d in out["applications"][0]["deployments"] if d["name"] == "EngineReplica")
    assert "request_router_config" in engine("proxy")
    assert ("request_router_config" in engine("haproxy")) == kept
