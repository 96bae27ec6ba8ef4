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
    def __init__(self, host: str, port: int, poll_s: float = 0.5):
        self.hub = MetricsHub()
        self.server, _ = start_http_server(port, addr=host, registry=self.hub.metrics.registry)
        self._stop = threading.Event()
        threading.Thread(target=self._poll_autoscaling, args=(poll_s,), daemon=True).start()

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

    def apply(self, report: MetricsReport) -> None:
        self.hub.apply(report)

    def __del__(self):
        self._stop.set()
        self.server.shutdown()
