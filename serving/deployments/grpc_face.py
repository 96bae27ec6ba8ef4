"""The gRPC face of the app: the RPC methods Ray Serve's gRPC proxy calls on the app's
ingress deployment, by name (Generate / Complete / Tokenize of moe_serving.v1.MoEServing, Check / Watch
of grpc.health.v1.Health, and KServe v2's ServerLive ... ModelStreamInfer of
inference.GRPCInferenceService), each delegating to a GenerateService or the KServeService over it.

Two deployments wear it (AppConfig.ingress picks which one the proxy calls):
- `engine`: the EngineReplica itself, over an in-process engine client. A streamed message
  makes one Ray hop (engine -> proxy).
- `deployment`: the Ingress deployment, over the EngineReplica's streaming handle. Two hops
  (engine -> ingress -> proxy), and the ingress replicas scale apart from the engine.
"""
from __future__ import annotations

from typing import Any

from serving.api.kserve import KServeService
from serving.api.service import EngineClient, GenerateService, RequestRecord
from serving.api.tenants import TenantGate
from serving.api.validation import ApiLimits
from serving.deployments.config import AppConfig
from serving.deployments.reporter import MetricsReporter
from serving.metrics import RequestSample
from serving.model.config import MoEConfig
from serving.model.tokenizer import Tokenizer


def request_sample(record: RequestRecord) -> RequestSample:
    priority = record.priority.name.lower() if record.priority is not None else "unknown"
    return RequestSample(status=record.status, priority=priority, ttft_s=record.ttft_s,
                         itl_s=record.itl_s, e2e_s=record.e2e_s, tenant=record.tenant,
                         prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens)


def build_service(cfg: AppConfig, model_cfg: MoEConfig, tokenizer: Tokenizer, engine: EngineClient,
                  reporter: MetricsReporter, *, ready: bool) -> GenerateService:
    """The servicer for the served model (`model_cfg` sets the request limits, with `cfg`'s caps),
    every finished RPC reported (status, TTFT, ITL, e2e, tenant) through `reporter`; with
    `cfg.tenants`, bearer-token auth and per-tenant quotas on this replica."""
    limits = ApiLimits.from_model_config(model_cfg,
                                         max_model_len=cfg.model_len(model_cfg.max_position_embeddings),
                                         max_tokens_limit=cfg.max_tokens_limit)
    return GenerateService(tokenizer, limits, engine,
                           on_request_done=lambda r: reporter.record_request(request_sample(r)),
                           ready=ready, tenants=TenantGate(cfg.tenants) if cfg.tenants is not None else None)


class GrpcFace:
    """Mixin for a Serve deployment, which calls `setup_faces` in its constructor. `probe_ready`
    runs before every health and readiness answer (the Ingress checks that the engine answers)."""

    service: GenerateService
    kserve: KServeService

    def setup_faces(self, cfg: AppConfig, model_cfg: MoEConfig, tokenizer: Tokenizer, engine: EngineClient,
                    reporter: MetricsReporter, *, ready: bool) -> None:
        """`service` (build_service's) and `kserve` over it, serving the model as `cfg.model_name`."""
        self.service = build_service(cfg, model_cfg, tokenizer, engine, reporter, ready=ready)
        self.kserve = KServeService(self.service, cfg.model_name)

    async def Generate(self, request: Any, grpc_context: Any = None):
        async for chunk in self.service.generate(request, grpc_context):
            yield chunk

    async def Complete(self, request: Any, grpc_context: Any = None) -> Any:
        return await self.service.complete(request, grpc_context)

    async def Tokenize(self, request: Any, grpc_context: Any = None) -> Any:
        return self.service.tokenize(request, grpc_context)

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        await self.probe_ready()
        return self.service.check(request, grpc_context)

    async def Watch(self, request: Any, grpc_context: Any = None):
        await self.probe_ready()
        yield self.service.check(request, grpc_context)

    async def probe_ready(self) -> None:
        """Nothing to probe by default: a replica only gets traffic once it is up."""

    # ---- inference.GRPCInferenceService (KServe v2; serving/api/kserve.py) -------------------

    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:
        return self.kserve.server_live(request, grpc_context)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:
        await self.probe_ready()
        return self.kserve.server_ready(request, grpc_context)

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:
        await self.probe_ready()
        return self.kserve.model_ready(request, grpc_context)

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:
        return self.kserve.server_metadata(request, grpc_context)

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:
        return self.kserve.model_metadata(request, grpc_context)

    async def ModelConfig(self, request: Any, grpc_context: Any = None) -> Any:
        return self.kserve.model_config(request, grpc_context)

    async def RepositoryIndex(self, request: Any, grpc_context: Any = None) -> Any:
        await self.probe_ready()
        return self.kserve.repository_index(request, grpc_context)

    async def ModelStatistics(self, request: Any, grpc_context: Any = None) -> Any:
        return self.kserve.model_statistics(request, grpc_context)

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:
        return await self.kserve.model_infer(request, grpc_context)

    async def ModelStreamInfer(self, requests: Any, grpc_context: Any = None):
        async for response in self.kserve.model_stream_infer(requests, grpc_context):
            yield response
