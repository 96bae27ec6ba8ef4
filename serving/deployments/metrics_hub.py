"""MetricsHub deployment: one replica serving every metric on the metrics port."""
from __future__ import annotations

from prometheus_client import start_http_server
from ray import serve

from serving.metrics import MetricsHub, MetricsReport


@serve.deployment(num_replicas=1)
class MetricsHubDeployment:
    def __init__(self, host: str, port: int):
        self.hub = MetricsHub()
        self.server, _ = start_http_server(port, addr=host, registry=self.hub.metrics.registry)

    def apply(self, report: MetricsReport) -> None:
        self.hub.apply(report)

    def __del__(self):
        self.server.shutdown()
