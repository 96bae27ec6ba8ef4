"""In Ray Serve's gRPC proxy: a request whose replica died answers UNAVAILABLE, not INTERNAL.

With the engine replica as the ingress (the default), the proxy streams straight from it. If that
replica's process or node dies mid-request, the proxy's stream raises Ray's ActorDiedError and
Ray 2.60 maps it to INTERNAL with Ray's own text (`get_grpc_response_status`,
`ray/serve/_private/grpc_util.py`). INTERNAL tells a client "a bug, do not retry", and gRPC retry
policies only retry UNAVAILABLE. A lost replica is an infrastructure fault: Serve replaces it,
and meanwhile routes new requests to the other replicas or queues them. So the proxy answers
UNAVAILABLE with our message (serving/api/errors.py: which error, what was lost, when to retry).
Everything else keeps Ray's mapping: an exception our code raised arrives wrapped in RayTaskError
and stays INTERNAL; timeouts, cancels, back-pressure and user-set codes are unchanged.

`install()` is called in the proxy process by the servicer function it imports
(`serving.api.protos.add_MoEServingServicer_to_server`), next to the log filter. It replaces the
name `get_grpc_response_status` in `ray.serve._private.proxy`, which Ray's gRPC proxy calls for
every failed request; Ray is pinned (pyproject.toml) and tests/test_cluster_e2e.py kills an engine
replica mid-stream to check the code that reaches the client.
"""
from __future__ import annotations

import grpc

from serving.api.errors import is_lost_replica, lost_replica_details

_MARK = "_moe_serve_lost_replica"


def install() -> bool:
    """Wrap the proxy's status mapping (idempotent). False when this Ray has no such function."""
    try:
        from ray.serve._private import proxy
        from ray.serve._private.proxy_request_response import ResponseStatus
    except ImportError:
        return False
    original = getattr(proxy, "get_grpc_response_status", None)
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True

    def get_grpc_response_status(exc: BaseException, request_timeout_s, request_id: str):
        if is_lost_replica(exc):
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True,
                                  message=lost_replica_details(exc))
        return original(exc, request_timeout_s, request_id)

    setattr(get_grpc_response_status, _MARK, True)
    proxy.get_grpc_response_status = get_grpc_response_status
    return True
