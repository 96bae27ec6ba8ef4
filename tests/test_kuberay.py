"""The KubeRay RayService (serving/kuberay.py, `moe-serve manifest`): its Serve config passes Ray
Serve's own schema and our AppConfig, every `moe_node_<i>` the app pins to is carried by exactly one
pod, the ports and the checkpoint volume line up, and the shipped example is what the generator
writes. (Applying it needs a Kubernetes cluster; none is reachable here.)"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serving.cli import main
from serving.deployments.config import AppConfig, node_resource
from serving.deployments.worker_setup import SETUP_HOOK, worker_runtime_env

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "cluster" / "kuberay" / "rayservice.yaml"


def _manifest(tmp_path: Path, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "rs.yaml"
    assert main(["manifest", "--out", str(out), *flags]) == 0
    text = out.read_text()
    return yaml.safe_load(text), text


def _pod_resources(group: dict) -> dict:
    # rayStartParams.resources is a shell word: '"{\"moe_node_1\": 1}"' -> the JSON object
    return json.loads(shlex.split(group["rayStartParams"]["resources"])[0])


@pytest.mark.parametrize("shards, nodes, transport, ingress", [(2, 2, None, None), (4, 3, "collective", "haproxy"),
                                                              (3, 1, "serve", "proxy")])
def test_manifest_is_a_valid_rayservice_for_the_app(tmp_path, shards, nodes, transport, ingress):
    flags = ["--checkpoint", "/models/mx-small", "--expert-shards", str(shards), "--nodes", str(nodes)]
    if transport:
        flags += ["--transport", transport]
    if ingress:
        flags += ["--grpc-ingress", ingress]
    rs, _ = _manifest(tmp_path, *flags)
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_cfg) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(serve_cfg)
    (app,) = schema.applications
    assert app.route_prefix == "/moe" and app.import_path == "serving.deployments.app:build_app"
    cfg = AppConfig.from_args(serve_cfg["applications"][0]["args"])
    assert (cfg.checkpoint, cfg.expert_shards, cfg.nodes) == ("/models/mx-small", shards, nodes)
    assert cfg.transport == (transport or "serve") and cfg.metrics_host == "0.0.0.0"
    shard_deps = sorted(d["name"] for d in serve_cfg["applications"][0]["deployments"]
                        if d["name"].startswith("ExpertShard"))
    assert shard_deps == ([f"ExpertShard{s}" for s in range(shards)] if cfg.transport == "serve" else [])
    assert serve_cfg["applications"][0]["runtime_env"] == {"worker_process_setup_hook": SETUP_HOOK}

    cluster = rs["spec"]["rayClusterConfig"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    # node i of the app (moe_node_<i>) is exactly one pod: the head is 0, worker group i is i
    carried = [_pod_resources(head)] + [_pod_resources(w) for w in workers]
    assert carried == [{node_resource(i): 1} for i in range(nodes)]
    assert all(w["replicas"] == w["minReplicas"] == w["maxReplicas"] == 1 for w in workers)
    # every shard's pin (s mod nodes) and the engine's (0) is carried by some pod
    needed = {node_resource(s % nodes) for s in range(shards)} | {node_resource(0)}
    assert needed <= {k for c in carried for k in c}
    # the head exposes the gRPC and metrics ports the Serve config uses (KubeRay's head Service
    # publishes the head container's named ports)
    (head_c,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_c["ports"]}
    assert ports["grpc"] == serve_cfg["grpc_options"]["port"] == 9000
    assert ports["metrics"] == cfg.metrics_port
    # every pod mounts the checkpoint volume at the checkpoint's parent, read-only, from the claim
    for group in [head, *workers]:
        spec = group["template"]["spec"]
        (c,) = spec["containers"]
        assert c["volumeMounts"] == [{"name": "checkpoint", "mountPath": "/models", "readOnly": True}]
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "moe-checkpoints"
        assert {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"} in c["env"]
        # Ray Serve's HAProxy mode is read from the environment of every Ray process
        assert ({"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in c["env"]) == (ingress == "haproxy")


def test_bad_flags_are_refused(tmp_path, capsys):
    assert main(["manifest", "--checkpoint", "models/relative"]) == 1
    assert "absolute" in capsys.readouterr().err
    assert main(["manifest", "--checkpoint", "/m/x", "--nodes", "0"]) == 1


def test_shipped_example_is_what_the_generator_writes(tmp_path):
    header = SHIPPED.read_text().splitlines()[0]
    command = header.split("`")[1]
    assert command.startswith("moe-serve manifest ")
    _, text = _manifest(tmp_path, *shlex.split(command)[2:])
    assert text == SHIPPED.read_text(), f"regenerate it: {command} --out {SHIPPED.relative_to(REPO)}"


def test_the_workers_runtime_env_is_a_fresh_dict_each_time():
    """ray.init adds keys (env_vars) to the runtime_env it is given: a shared dict would carry them
    into the next cluster's manifest (it did, in CI, after a test had started a local cluster)."""
    env = worker_runtime_env()
    env["env_vars"] = {"__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR": SETUP_HOOK}
    assert worker_runtime_env() == {"worker_process_setup_hook": SETUP_HOOK}
