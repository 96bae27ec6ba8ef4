"""Ingress deployment (AppConfig.ingress = "deployment"): the gRPC face of the app in its own
deployment, in front of the EngineReplica's streaming handle. A shim around GenerateService
(the RPC methods are GrpcFace's, serving/deployments/grpc_face.py)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ray import serve

from serving.api import log_filters
from serving.deployments.config import AppConfig
from serving.deployments.grpc_face import GrpcFace
from serving.deployments.reporter import MetricsReporter
from serving.engine.request import GenerationRequest, TokenEvent
from serving.model.config import MoEConfig
from serving.model.tokenizer import Tokenizer


class HandleEngineClient:
    """EngineClient over the EngineReplica deployment handle (streaming)."""

    def __init__(self, handle):
        self.handle = handle.options(stream=True)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[TokenEvent]]:
        response = self.handle.generate.remote(request)
        try:
            async for chunk in response:        # a list of TokenEvents: one message
                yield chunk
        finally:   # client gone or finished: cancelling aborts the request in the engine
            response.cancel()


@serve.deployment
class Ingress(GrpcFace):
    def __init__(self, args: dict, engine_handle, metrics_hub):
        log_filters.install()                 # no traceback per shed / invalid request
        cfg = AppConfig.from_args(args)
        replica = serve.get_replica_context().replica_id.unique_id
        self.reporter = MetricsReporter(metrics_hub, f"ingress-{replica}", cfg.report_interval_s)
        self.engine_handle = engine_handle
        self.setup_faces(cfg, MoEConfig.from_dir(cfg.checkpoint), Tokenizer.from_dir(cfg.checkpoint),
                         HandleEngineClient(engine_handle), self.reporter, ready=False)

    async def probe_ready(self) -> None:
        """SERVING once the engine answers (Serve only routes here once replicas run)."""
        if not self.service.ready:
            try:
                await asyncio.wait_for(self.engine_handle.ready.remote(), timeout=5.0)
                self.service.ready = True
            except Exception:   # not up yet: health says NOT_SERVING
                pass

    def __del__(self):
        self.reporter.stop()
