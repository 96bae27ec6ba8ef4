"""The app builder: `import_path: serving.deployments.app:build_app` in cluster/*.yaml.

Graph: [Ingress ->] EngineReplica -> ExpertShard0..S-1, and every replica -> MetricsHub.
With ingress `engine` the EngineReplica is the app's ingress (the gRPC proxy calls it); with
`deployment` an Ingress deployment sits in front of it.
ExpertShard s is pinned to local Ray node (s mod nodes) by its `moe_node_<i>` resource,
so with nodes >= S every shard runs on a different node. With transport `collective` there
are no ExpertShard deployments: each EngineReplica starts its own shard actors, pinned the
same way (serving/parallel/collective_transport.py).
"""
from __future__ import annotations

from dataclasses import asdict

from ray.serve import Application

from serving.deployments.config import NODE_PIN, AppConfig, node_resource
from serving.deployments.engine_replica import EngineReplica
from serving.deployments.expert_shard import ExpertShard
from serving.deployments.ingress import Ingress
from serving.deployments.metrics_hub import MetricsHubDeployment
from serving.model.config import MoEConfig
from serving.parallel.placement import Placement

ENGINE_ROUTER_QUEUE = 64    # requests a caller may queue for busy engine replicas before Serve sheds
ENGINE_ADMISSION_HEADROOM = 256   # requests in transit to admission beyond what it can hold (shed at once)
INGRESS_MAX_ONGOING = 1000   # streams one ingress replica relays; the engine admits or sheds


def shard_deployment_name(shard: int) -> str:
    return f"ExpertShard{shard}"


def build_app(args: dict) -> Application:
    cfg = AppConfig.from_args(args)
    placement = Placement.build(MoEConfig.from_dir(cfg.checkpoint), cfg.expert_shards, cfg.placement)
    rebalance = None if cfg.auto_rebalance is None else {
        "policy": asdict(cfg.auto_rebalance), "checkpoint": cfg.checkpoint, "placement": placement.to_json()}
    hub = MetricsHubDeployment.options(
        ray_actor_options={"num_cpus": 0.01, "resources": {node_resource(0): NODE_PIN}},
    ).bind(cfg.metrics_host, cfg.metrics_port, rebalance=rebalance)
    shards = []
    if cfg.transport == "serve":
        shards = [ExpertShard.options(
            name=shard_deployment_name(s),
            ray_actor_options={"num_cpus": cfg.shard_num_cpus,
                               "resources": {node_resource(s % cfg.nodes): NODE_PIN}},
        ).bind(cfg.checkpoint, placement.to_json(), s, cfg.dtype, cfg.compute_nice, cfg.max_num_batched_tokens)
            for s in range(cfg.expert_shards)]
    engine = EngineReplica.options(
        ray_actor_options={"num_cpus": cfg.engine_num_cpus, "resources": {node_resource(0): NODE_PIN}},
        # Serve must hand every request to the replica's own admission control, which sheds
        # with a retry hint; its router queue would only hide the backlog.
        max_ongoing_requests=cfg.max_num_seqs + cfg.max_queued + ENGINE_ADMISSION_HEADROOM,
        max_queued_requests=ENGINE_ROUTER_QUEUE,   # beyond: BackPressureError -> RESOURCE_EXHAUSTED
    ).bind(cfg.to_args(), placement.to_json(), shards, hub)
    if cfg.ingress == "engine":
        return engine
    return Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
                           max_ongoing_requests=INGRESS_MAX_ONGOING).bind(
        cfg.to_args(), engine, hub)
