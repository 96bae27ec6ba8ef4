"""MetricsHub deployment: one replica serving every metric on the metrics port."""
from __future__ import annotations

import json
import logging
import threading

from prometheus_client import start_http_server
from ray import serve

from serving.metrics import AUTOSCALING_KV_NAMESPACE, AUTOSCALING_KV_PREFIX, MetricsHub, MetricsReport

log = logging.getLogger(__name__)


@serve.deployment(num_replicas=1)
class MetricsHubDeployment:
    def __init__(self, host: str, port: int, poll_s: float = 0.5, rebalance: dict | None = None):
        self.hub = MetricsHub()
        self.server, _ = start_http_server(port, addr=host, registry=self.hub.metrics.registry)
        self._stop = threading.Event()
        threading.Thread(target=self._poll_autoscaling, args=(poll_s,), daemon=True).start()
        if rebalance is not None:
            threading.Thread(target=self._auto_rebalance, args=(rebalance,), name="auto-rebalance",
                             daemon=True).start()

    def _poll_autoscaling(self, poll_s: float) -> None:
        """Autoscaling decisions are taken in the Serve controller, which publishes them to
        Ray's GCS KV store (serving.metrics.record_autoscaling_decision); export them here."""
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list
        while not self._stop.wait(poll_s):
            try:
                for key in _internal_kv_list(AUTOSCALING_KV_PREFIX, namespace=AUTOSCALING_KV_NAMESPACE):
                    raw = _internal_kv_get(key, namespace=AUTOSCALING_KV_NAMESPACE)
                    if raw:
                        self.hub.apply_autoscaling(json.loads(raw))
            except Exception as exc:   # metrics must never take the hub down
                log.warning("autoscaling metrics poll failed: %s", exc)

    def _auto_rebalance(self, spec: dict) -> None:
        """auto_rebalance: every interval, judge the tokens routed since the last one and publish a
        load-aware placement when it balances the shards better (serving/parallel/rebalance.py);
        engines and shards pick it up as they do `moe-serve placement --apply`'s."""
        from serving.deployments.placement_sync import publish_placement, read_published
        from serving.model.config import MoEConfig
        from serving.parallel.placement import Placement
        from serving.parallel.rebalance import AutoRebalancer, RebalancePolicy
        policy = RebalancePolicy.from_dict(spec["policy"])
        config = MoEConfig.from_dir(spec["checkpoint"])
        deployed = Placement.from_json(spec["placement"])

        def current() -> Placement:
            return read_published() or deployed
        rebalancer = AutoRebalancer(policy, config, lambda: self.hub.routed_load(config.num_experts),
                                    current, publish_placement)
        while not self._stop.wait(policy.interval_s):
            try:
                decision = rebalancer.tick()
                self.hub.apply_rebalance(decision, rebalancer.in_force.version)
                if decision.plan is not None:
                    log.info("automatic rebalancing: placement version %d published (predicted step "
                             "imbalance %.3f -> %.3f over %.0f routed tokens a layer)", decision.plan.version,
                             decision.before, decision.after, decision.window_tokens)
            except Exception as exc:   # noqa: BLE001 -- the hub serves metrics whatever happens here
                log.warning("automatic rebalancing failed: %s", exc)

    def apply(self, report: MetricsReport) -> None:
        self.hub.apply(report)

    def __del__(self):
        self._stop.set()
        self.server.shutdown()
