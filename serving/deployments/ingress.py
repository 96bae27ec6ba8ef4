"""Ingress deployment: the gRPC face of the app. A shim around GenerateService.

Ray Serve's gRPC proxy routes each RPC by method name to the method of the same name
here: Generate / Complete (moe_serving.v1.MoEServing) and Check / Watch
(grpc.health.v1.Health).
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ray import serve

from serving.api.protos import health_pb2
from serving.api.service import GenerateService, RequestRecord
from serving.api.validation import ApiLimits
from serving.deployments.config import AppConfig
from serving.deployments.reporter import MetricsReporter
from serving.engine.request import GenerationRequest, TokenEvent
from serving.metrics import RequestSample
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


def _sample(record: RequestRecord) -> RequestSample:
    priority = record.priority.name.lower() if record.priority is not None else "unknown"
    return RequestSample(status=record.status, priority=priority, ttft_s=record.ttft_s,
                         itl_s=record.itl_s, e2e_s=record.e2e_s)


@serve.deployment
class Ingress:
    def __init__(self, args: dict, engine_handle, metrics_hub):
        cfg = AppConfig.from_args(args)
        model_cfg = MoEConfig.from_dir(cfg.checkpoint)
        limits = ApiLimits.from_model_config(model_cfg,
                                             max_model_len=cfg.model_len(model_cfg.max_position_embeddings),
                                             max_tokens_limit=cfg.max_tokens_limit)
        replica = serve.get_replica_context().replica_id.unique_id
        self.reporter = MetricsReporter(metrics_hub, f"ingress-{replica}", cfg.report_interval_s)
        self.engine_handle = engine_handle
        self.service = GenerateService(Tokenizer.from_dir(cfg.checkpoint), limits,
                                       HandleEngineClient(engine_handle),
                                       on_request_done=lambda r: self.reporter.record_request(_sample(r)),
                                       ready=False)

    async def Generate(self, request, grpc_context=None):
        async for chunk in self.service.generate(request, grpc_context):
            yield chunk

    async def Complete(self, request, grpc_context=None):
        return await self.service.complete(request, grpc_context)

    async def Check(self, request, grpc_context=None):
        await self._probe_engine()
        return self.service.check(request, grpc_context)

    async def Watch(self, request, grpc_context=None):
        await self._probe_engine()
        yield self.service.check(request, grpc_context)

    async def _probe_engine(self) -> None:
        """SERVING once the engine answers (Serve only routes here once replicas run)."""
        if not self.service.ready:
            try:
                await asyncio.wait_for(self.engine_handle.ready.remote(), timeout=5.0)
                self.service.ready = True
            except Exception:   # not up yet: health says NOT_SERVING
                pass

    def __del__(self):
        self.reporter.stop()
