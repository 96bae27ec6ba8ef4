"""Serve a GenerateService from a plain grpc.aio server (no Ray): tests and debugging.

    python -m serving.api.local_server --port 50051      # echo engine, fake tokenizer
    moe-serve generate --target 127.0.0.1:50051 --prompt hello --json

The adapter is the same shape as the Ray Serve ingress: one method per RPC, delegating
to the service with the call's context.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any, AsyncIterator

import grpc

from serving.api.errors import RpcAbort
from serving.api.kserve import KServeService
from serving.api.protos import SERVICE_NAMES, health_pb2_grpc, pb2_grpc, register_kserve, register_moe_serving
from serving.api.service import GenerateService
from serving.engine.request import FinishReason, GenerationRequest, TokenEvent

logger = logging.getLogger(__name__)


class LocalMoEServicer(pb2_grpc.MoEServingServicer):
    def __init__(self, service: GenerateService):
        self.service = service

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[Any]:
        try:
            async for chunk in self.service.generate(request, context):
                yield chunk
        except RpcAbort:
            return      # the status is already set on `context`; grpc.aio sends it

    async def Complete(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.service.complete(request, context)

    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.service.tokenize(request, context)


class LocalKServeServicer:
    """inference.GRPCInferenceService (serving/api/kserve.py), one method per RPC."""

    def __init__(self, kserve: KServeService):
        self.kserve = kserve

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.kserve.server_live(request, context)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.kserve.server_ready(request, context)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.kserve.model_ready(request, context)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.kserve.server_metadata(request, context)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.kserve.model_metadata(request, context)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.kserve.model_config(request, context)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.kserve.repository_index(request, context)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.kserve.model_statistics(request, context)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.kserve.model_infer(request, context)

    async def ModelStreamInfer(self, requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in self.kserve.model_stream_infer(requests, context):
            yield response


class LocalHealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, service: GenerateService):
        self.service = service

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.service.check(request, context)


async def start_local_server(service: GenerateService, *, host: str = "127.0.0.1",
                             port: int = 0, reflection: bool = True, model_name: str = "local"
                             ) -> tuple[grpc.aio.Server, int]:
    """Start serving `service` (and KServe v2 over it, the model named `model_name`); returns
    (server, bound port). Stop with `server.stop(0)`."""
    server = grpc.aio.server()
    register_moe_serving(LocalMoEServicer(service), server)
    register_kserve(LocalKServeServicer(KServeService(service, model_name)), server)
    health_pb2_grpc.add_HealthServicer_to_server(LocalHealthServicer(service), server)
    if reflection:
        from grpc_reflection.v1alpha import reflection as grpc_reflection
        grpc_reflection.enable_server_reflection(
            SERVICE_NAMES + (grpc_reflection.SERVICE_NAME,), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    return server, bound


# ---- debugging stand-ins (no model needed) ------------------------------------------

class ByteTokenizer:
    """Token id = byte value + 1 (0 is BOS). Good enough to exercise the API."""
    vocab_size = 257
    bos_id = 0

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [b + 1 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 1 for i in ids if 0 < i < 257).decode(errors="replace")


class EchoEngine:
    """Echoes the prompt back (BOS skipped), cycling, one token every `delay_s`."""

    def __init__(self, tokenizer: ByteTokenizer | None = None, delay_s: float = 0.0):
        self.tokenizer = tokenizer or ByteTokenizer()
        self.delay_s = delay_s

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        prompt = [t for t in request.prompt_token_ids if t != 0] or [1]
        n = request.sampling.max_tokens
        for i in range(n):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            tok = prompt[i % len(prompt)]
            yield TokenEvent(request_id=request.request_id, token_id=tok,
                             text_delta=self.tokenizer.decode([tok]),
                             logprob=-0.5 if request.sampling.logprobs else None,
                             finish_reason=FinishReason.LENGTH if i == n - 1 else None,
                             prompt_tokens=len(request.prompt_token_ids),
                             completion_tokens=i + 1)


async def _serve(port: int, delay_s: float) -> None:
    from serving.api.validation import ApiLimits
    tok = ByteTokenizer()
    service = GenerateService(tok, ApiLimits(vocab_size=tok.vocab_size, max_model_len=4096),
                              EchoEngine(tok, delay_s),
                              on_request_done=lambda r: logger.info("%s", r))
    server, bound = await start_local_server(service, port=port)
    logger.info("serving the echo engine on 127.0.0.1:%d", bound)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve the gRPC API with an echo engine (debugging).")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--delay-s", type=float, default=0.0, help="seconds per generated token")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_serve(args.port, args.delay_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
