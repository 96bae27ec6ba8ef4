"""A KubeRay RayService manifest for the app: the same Serve config `moe-serve up` deploys, on a
Kubernetes cluster instead of local Ray nodes.

    moe-serve manifest --checkpoint /models/mixtral-small --expert-shards 2 --nodes 2 > rayservice.yaml
    kubectl apply -f rayservice.yaml

Layout (what `moe-serve up` does with local nodes, here with pods):
  - the head pod is node 0: it carries the `moe_node_0` resource, so the engine replicas, the
    MetricsHub and Serve's gRPC proxy run there;
  - worker group `expert-node-<i>` (one pod each, i = 1..nodes-1) carries `moe_node_<i>`, so
    ExpertShard s (or the collective transport's shard actor s) runs on node s mod nodes;
  - `serveConfigV2` is `resolve_serve_config`'s output (cluster/serve_config.yaml with the flags
    filled in), with the metrics endpoint on 0.0.0.0 so Prometheus can scrape the pod, and the
    workers' setup hook as the application's runtime_env (as `moe-serve up` sets it for the job);
  - the checkpoint is read from a volume mounted at the checkpoint's directory on every pod
    (a PersistentVolumeClaim `--checkpoint-claim`, ReadOnlyMany), never from a model hub;
  - KubeRay's head Service `<name>-head-svc` exposes the head container's named ports: gRPC
    (`grpc`, the Serve config's port) and metrics (`metrics`) among them.

The image is built from cluster/Dockerfile (torch CPU wheel pinned, this package installed).
Tested here: the manifest's structure and its Serve config against Ray's own schema and our
AppConfig (tests/test_kuberay.py). Not tested here: applying it to a Kubernetes cluster (none is
reachable from this machine).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from serving.deployments.config import node_resource
from serving.deployments.worker_setup import worker_runtime_env
from serving.launcher import GRPC_INGRESSES, HAPROXY_MODE_ENV, RAY_PROCESS_ENV

RAY_VERSION = "2.60.0"
GRPC_PORT, METRICS_PORT, SERVE_HTTP_PORT = 9000, 9464, 8000     # `moe-serve manifest`'s defaults


def _container(name: str, image: str, cpu: str, memory: str, mount: str, ports: list[tuple[str, int]],
               env: dict[str, str]) -> dict:
    container = {
        "name": name, "image": image, "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
        "volumeMounts": [{"name": "checkpoint", "mountPath": mount, "readOnly": True}],
        # compute_nice (the step loop and shard threads ahead of Serve's streaming threads) needs it
        "securityContext": {"capabilities": {"add": ["SYS_NICE"]}},
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }
    if ports:
        container["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    return container


def _pod(container: dict, claim: str) -> dict:
    return {"spec": {"containers": [container],
                     "volumes": [{"name": "checkpoint",
                                  "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]}}


def _resources_param(resources: dict[str, float]) -> str:
    """rayStartParams values go into the `ray start` command line: the JSON quoted, as KubeRay's
    docs write it ('"{\\"TPU\\": 4}"')."""
    return json.dumps(json.dumps(resources))


def rayservice_manifest(serve_config: dict, *, name: str = "moe-serve", image: str = "moe-serving:latest",
                        checkpoint_claim: str = "moe-checkpoints", head_cpu: str = "8", head_memory: str = "32Gi",
                        worker_cpu: str = "8", worker_memory: str = "32Gi", grpc_ingress: str = "proxy") -> dict:
    """The RayService for `serve_config` (resolve_serve_config's output). `grpc_ingress` "haproxy":
    Ray Serve's HAProxy mode on every pod (serving/launcher.py GRPC_INGRESSES), HAProxy then listens
    on the head's gRPC port."""
    if grpc_ingress not in GRPC_INGRESSES:
        raise ValueError(f"grpc_ingress must be one of {GRPC_INGRESSES}, got {grpc_ingress!r}")
    env = {**RAY_PROCESS_ENV, **(HAPROXY_MODE_ENV if grpc_ingress == "haproxy" else {})}
    cfg = json.loads(json.dumps(serve_config))              # a deep copy we may edit
    app = cfg["applications"][0]
    args = app["args"]
    nodes, checkpoint = int(args["nodes"]), str(args["checkpoint"])
    mount = str(Path(checkpoint).parent)
    args["metrics_host"] = "0.0.0.0"                        # scraped from outside the pod
    app["runtime_env"] = {**worker_runtime_env(), **app.get("runtime_env", {})}
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"]["host"] = "0.0.0.0"
    head_ports = [("gcs", 6379), ("dashboard", 8265), ("serve", int(cfg["http_options"]["port"])),
                  ("grpc", int(cfg["grpc_options"]["port"])), ("metrics", int(args["metrics_port"]))]
    workers = [{
        "groupName": f"expert-node-{i}", "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
        "rayStartParams": {"resources": _resources_param({node_resource(i): 1})},
        "template": _pod(_container("ray-worker", image, worker_cpu, worker_memory, mount, [], env), checkpoint_claim),
    } for i in range(1, nodes)]
    service = {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(cfg, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0",
                                       "resources": _resources_param({node_resource(0): 1})},
                    "template": _pod(_container("ray-head", image, head_cpu, head_memory, mount, head_ports, env),
                                     checkpoint_claim),
                },
                "workerGroupSpecs": workers,
            },
        },
    }
    return service


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as YAML literal blocks, as KubeRay's examples write them;
    no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_BlockDumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def render(manifest: dict, command: str) -> str:
    return (f"# Generated by `{command}` (serving/kuberay.py); edit the generator, not this file.\n"
            + yaml.dump(manifest, Dumper=_BlockDumper, sort_keys=False, width=120))
