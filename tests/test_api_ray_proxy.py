"""GenerateService behind Ray Serve's real gRPC proxy: do the status codes reach the client?
And does an unmodified tritonclient get through it to the KServe v2 face (serving/api/kserve.py),
unary and bidirectional streaming?

The proxy only copies a code set on the replica's grpc_context when a result comes back,
so a streaming method that fails before its first chunk must raise (GenerateService does).
This checks that end to end, on loopback, with an echo engine, over both of the proxy's data paths
to the replicas (gRPC, as shipped, and Ray actor calls). Slow: marked `cluster`.
A second application ("tenants") gates its service with bearer tokens and a quota
(serving/api/tenants.py): the `authorization` metadata must reach the replica through the proxy,
and UNAUTHENTICATED must come back out.
"""
from __future__ import annotations

import os
import shutil
import time

import grpc
import pytest

from serving.ports import free_port

pytestmark = pytest.mark.cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CHAT_TOKEN = "chat-token"
# sha256 of CHAT_TOKEN (`moe-serve token-hash`), as the Serve config holds it
TENANTS = {"quotas": {"chat": {"max_in_flight": 1}}, "in_flight_retry_s": 0.4,
           "tokens": {"f782c6855e3280eaef1d6f6de3556ffd08decd912ef0a064e4466b1c28d3fb13": "chat"}}


# How Ray's proxy reaches the replicas (read by the proxy at start, from the environment its
# local Ray inherits): over gRPC, as `moe-serve up` ships it (serving/launcher.py SERVE_DATA_PATH_ENV),
# and over Ray actor calls, Ray's default. Every test below runs on both.
DATA_PATHS = {"grpc": "1", "actor-calls": "0"}


@pytest.fixture(scope="module", params=sorted(DATA_PATHS))
def serve_target(request):
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.config import gRPCOptions

    from serving.api.protos import SERVICER_FUNCTIONS
    from serving.launcher import SERVE_DATA_PATH_ENV

    assert SERVE_DATA_PATH_ENV == {"RAY_SERVE_PROXY_USE_GRPC": DATA_PATHS["grpc"]}
    env = pytest.MonkeyPatch()            # undone when the fixture ends, however it ends
    request.addfinalizer(env.undo)
    env.setenv("RAY_SERVE_PROXY_USE_GRPC", DATA_PATHS[request.param])
    # the proxy's gRPC server on loopback, as `moe-serve up` has it (serving/deployments/grpc_bind.py)
    from serving.deployments.grpc_bind import GRPC_HOST_VAR
    from serving.deployments.worker_setup import worker_runtime_env
    env.setenv(GRPC_HOST_VAR, "127.0.0.1")
    os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    port = free_port()
    from local_ray_init import init_local_ray
    ray_tmp = init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False,
                             runtime_env=worker_runtime_env())
    try:        # Ray's processes go whatever fails from here on
        @ray.remote(num_cpus=0)
        def worker_env() -> str | None:          # what a Ray worker (the proxy is one) reads at start
            return os.environ.get("RAY_SERVE_PROXY_USE_GRPC")
        assert ray.get(worker_env.remote(), timeout=60) == DATA_PATHS[request.param]
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=SERVICER_FUNCTIONS))

        from serving.deployments.grpc_face import GrpcFace

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Ingress(GrpcFace):
            """The app's real RPC methods (GrpcFace), over an echo engine instead of the model."""

            def __init__(self, tenants: dict | None = None):
                from serving.api.errors import Overloaded
                from serving.api.kserve import KServeService
                from serving.api.local_server import ByteTokenizer, EchoEngine
                from serving.api.service import GenerateService
                from serving.api.tenants import TenantGate, TenantsConfig
                from serving.api.validation import ApiLimits

                class Engine(EchoEngine):
                    async def stream(self, request):
                        if request.request_id.startswith("busy"):
                            raise Overloaded("busy", retry_after_s=0.25)
                        async for ev in super().stream(request):
                            yield ev

                tok = ByteTokenizer()
                self.service = GenerateService(tok, ApiLimits(vocab_size=tok.vocab_size, max_model_len=64),
                                               Engine(tok, delay_s=0.05 if tenants else 0.0),
                                               tenants=TenantGate(TenantsConfig.from_dict(tenants)) if tenants else None)
                self.kserve = KServeService(self.service, "echo")

        serve.run(Ingress.bind(), name="moe", route_prefix="/moe")
        serve.run(Ingress.bind(TENANTS), name="tenants", route_prefix="/tenants")
        target = f"127.0.0.1:{port}"
        from serving.client import MoEClient
        deadline = time.monotonic() + 60
        for app in ("moe", "tenants"):
            with MoEClient(target, 5, application=app) as c:
                while True:
                    try:
                        assert c.health() == "SERVING"
                        break
                    except grpc.RpcError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
        from cluster_harness import LOOPBACK, listening_addresses
        listening = listening_addresses(port)
        assert listening and all(a.startswith(LOOPBACK) for a in listening), listening
        yield target
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_stream_and_unary_ok(serve_target):
    from serving.client import MoEClient
    with MoEClient(serve_target, 30, application="moe") as c:
        chunks = list(c.generate(prompt="abc", max_tokens=4, logprobs=True))
        assert "".join(ch.text for ch in chunks) == "abca"
        assert chunks[-1].usage.completion_tokens == 4
        done = c.complete(prompt="abc", max_tokens=4)
        assert done.text == "abca" and len(done.token_ids) == 4
        assert len(c.tokenize(prompt="abc").token_ids) == done.usage.prompt_tokens     # Tokenize routed too


@pytest.mark.parametrize("method", ["generate", "complete"])
def test_invalid_argument_reaches_client(serve_target, method):
    from serving.client import MoEClient
    with MoEClient(serve_target, 30, application="moe") as c:
        with pytest.raises(grpc.RpcError) as ei:
            r = getattr(c, method)(prompt="abc", max_tokens=0)
            if method == "generate":
                list(r)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details().startswith("max_tokens:")


@pytest.mark.parametrize("method", ["generate", "complete"])
def test_overloaded_reaches_client(serve_target, method):
    from serving.client import MoEClient
    with MoEClient(serve_target, 30, application="moe") as c:
        with pytest.raises(grpc.RpcError) as ei:
            r = getattr(c, method)(prompt="abc", request_id="busy-1")
            if method == "generate":
                list(r)
        err = ei.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after 250 ms" in err.details()
        trailers = dict(err.trailing_metadata() or ())
        if method == "complete":          # unary replies carry the trailer through Ray
            assert trailers.get("grpc-retry-pushback-ms") == "250"


def test_health_unknown_service(serve_target):
    from serving.client import MoEClient
    with MoEClient(serve_target, 30, application="moe") as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.health("nope")
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_tenant_auth_and_quota_through_the_proxy(serve_target):
    """No token: UNAUTHENTICATED (health stays open). chat's token: served, and while one of its
    streams runs, a second call is RESOURCE_EXHAUSTED naming the tenant."""
    from serving.client import MoEClient
    with MoEClient(serve_target, 30, application="tenants") as anon:
        assert anon.health() == "SERVING"
        for method in ("generate", "complete"):
            with pytest.raises(grpc.RpcError) as ei:
                r = getattr(anon, method)(prompt="abc", max_tokens=2)
                if method == "generate":
                    list(r)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, ei.value
            assert "bearer token" in ei.value.details()
    with MoEClient(serve_target, 30, application="tenants", token=CHAT_TOKEN) as chat:
        assert chat.complete(prompt="abc", max_tokens=3).text == "abc"
        stream = chat.generate(prompt="abc", max_tokens=40)            # 50 ms a token: 2 s
        next(stream)
        with pytest.raises(grpc.RpcError) as ei:
            chat.complete(prompt="abc", max_tokens=2)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'chat'" in ei.value.details()
        assert dict(ei.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms") == "400"
        assert len([t for ch in stream for t in ch.token_ids]) == 39    # the admitted stream: whole


@pytest.mark.parametrize("method", ["Complete", "Generate"])
def test_malformed_payload_is_invalid_argument_through_the_proxy(serve_target, method):
    """Bytes that do not parse as a GenerateRequest: the proxy's lenient deserializer
    (serving/api/protos.py) hands the replica a MalformedRequest, and the client gets
    INVALID_ARGUMENT "request: ...", not gRPC's UNKNOWN."""
    from serving.api.protos import pb2
    payload = b"\x0a\xff\xff\xff"                      # field 1 (text) with a length past the end
    with pytest.raises(Exception):
        pb2.GenerateRequest.FromString(payload)
    with grpc.insecure_channel(serve_target) as ch:
        path = f"/moe_serving.v1.MoEServing/{method}"
        call = (ch.unary_unary(path, request_serializer=None, response_deserializer=pb2.CompleteResponse.FromString)
                if method == "Complete" else
                ch.unary_stream(path, request_serializer=None, response_deserializer=pb2.GenerateResponse.FromString))
        with pytest.raises(grpc.RpcError) as ei:
            r = call(payload, timeout=30, metadata=(("application", "moe"),))
            if method == "Generate":
                list(r)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
    assert ei.value.details().startswith("request: not a valid moe_serving.v1.GenerateRequest")


def test_tritonclient_through_the_proxy(serve_target):
    """KServe v2 through Ray's proxy: health, ModelInfer (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED
    with its trailer), and ModelStreamInfer, which is bidirectional: the proxy hands the replica
    the request stream. On the tenants app the bearer token in the stream's metadata reaches it."""
    import queue

    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    prompt = tc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"abc"], dtype=object))
    stream = tc.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    moe = {"application": "moe"}
    client = tc.InferenceServerClient(serve_target)
    try:
        assert client.is_server_live(headers=moe) and client.is_server_ready(headers=moe)
        assert client.is_model_ready("echo", headers=moe) and not client.is_model_ready("x", headers=moe)
        result = client.infer("echo", [prompt], parameters={"max_tokens": 4}, headers=moe, request_id="k1")
        assert result.as_numpy("text_output")[0] == b"abcabca" and result.get_response().id == "k1"
        with pytest.raises(InferenceServerException) as ei:
            client.infer("echo", [prompt], parameters={"max_tokens": 0}, headers=moe)
        assert ei.value.status() == "StatusCode.INVALID_ARGUMENT" and ei.value.message().startswith("max_tokens:")
        with pytest.raises(InferenceServerException) as ei:
            client.infer("echo", [prompt], request_id="busy-k", headers=moe)
        assert ei.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "retry after 250 ms" in ei.value.message()
        (stats,) = client.get_inference_statistics("echo", headers=moe).model_stats     # Triton's statistics
        assert stats.name == "echo" and stats.inference_stats.success.count >= 1
        assert stats.inference_stats.fail.count >= 2          # the invalid and the shed one (one replica)

        # both requests run at once: on `tenants`, chat (1 in flight) is shed by its quota first
        chat = {"application": "tenants", "authorization": f"Bearer {CHAT_TOKEN}"}
        for app, headers, refusal in (
                ("moe", moe, "RESOURCE_EXHAUSTED: busy; retry after 250 ms"),
                ("tenants", chat, "RESOURCE_EXHAUSTED: tenant 'chat' is at its quota of 1 requests in flight "
                                  "on this replica; retry after 400 ms")):
            results: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers)
            client.async_stream_infer("echo", [prompt, stream], request_id="s1", parameters={"max_tokens": 3})
            client.async_stream_infer("echo", [prompt], request_id="busy-s")
            client.stop_stream()
            got = [results.get(timeout=30) for _ in range(4)]
            assert results.empty(), app
            texts = [r.as_numpy("text_output")[0] for r, e in got if e is None]
            assert texts == [b"a", b"b", b"c"], (app, got)
            (error,) = [e for _, e in got if e is not None]
            assert str(error) == refusal, app

        results = queue.Queue()            # the tenants app, no token: refused in-band
        client.start_stream(callback=lambda result, error: results.put((result, error)),
                            headers={"application": "tenants"})
        client.async_stream_infer("echo", [prompt], request_id="anon")
        client.stop_stream()
        _, error = results.get(timeout=30)
        assert str(error).startswith("UNAUTHENTICATED:") and results.empty()
    finally:
        client.close()
