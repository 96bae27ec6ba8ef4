"""The generated protobuf / gRPC modules, generated on first import if missing or stale.

Import messages from here, never from `serving.api.gen` directly:

    from serving.api.protos import pb2, pb2_grpc, health_pb2
"""
from __future__ import annotations

from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: F401  (re-exported)

from serving.api import codegen
from serving.api.errors import MalformedRequest

if not codegen.is_up_to_date():
    codegen.generate_protos()

from serving.api.gen import moe_serving_pb2 as pb2  # noqa: E402
from serving.api.gen import moe_serving_pb2_grpc as pb2_grpc  # noqa: E402

#: Fully qualified name of our service (as used by grpc.health.v1 and reflection).
SERVICE_NAME: str = pb2.DESCRIPTOR.services_by_name["MoEServing"].full_name
#: Full names of the services a server exposes (for grpc reflection).
SERVICE_NAMES: tuple[str, ...] = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)


def _lenient(parse: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: bytes that do not parse become a MalformedRequest,
    which validation answers with INVALID_ARGUMENT (gRPC answers a deserializer's error UNKNOWN)."""
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return MalformedRequest.undecodable(message_type, str(exc))
    return deserialize


def register_moe_serving(servicer: Any, server: Any) -> None:
    """`pb2_grpc.add_MoEServingServicer_to_server`, but with lenient request deserializers."""
    parse = _lenient(pb2.GenerateRequest.FromString, pb2.GenerateRequest.DESCRIPTOR.full_name)
    parse_tokenize = _lenient(pb2.TokenizeRequest.FromString, pb2.TokenizeRequest.DESCRIPTOR.full_name)
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=parse,
            response_serializer=pb2.GenerateResponse.SerializeToString),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=parse,
            response_serializer=pb2.CompleteResponse.SerializeToString),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Tokenize, request_deserializer=parse_tokenize,
            response_serializer=pb2.TokenizeResponse.SerializeToString),
    }
    methods = set(pb2.DESCRIPTOR.services_by_name["MoEServing"].methods_by_name)
    if methods != set(handlers):           # the proto grew a method: register it here too
        raise RuntimeError(f"MoEServing methods {sorted(methods)} != registered {sorted(handlers)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def register_kserve(servicer: Any, server: Any) -> None:
    """inference.GRPCInferenceService (KServe v2, serving/api/kserve.py): `servicer`'s method of each
    RPC's name. Requests arrive as bytes (no deserializer): the servicer parses them, so bytes that
    do not parse get INVALID_ARGUMENT, and what Ray's proxy pickles to the replica is plain bytes."""
    from serving.api.kserve_protos import METHODS, SERVICE_NAME as KSERVE_SERVICE
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {name: kinds[streams](getattr(servicer, name), request_deserializer=None,
                                     response_serializer=_serialize)
                for name, streams in METHODS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(KSERVE_SERVICE, handlers),))
    server.add_registered_method_handlers(KSERVE_SERVICE, handlers)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def add_GRPCInferenceServiceServicer_to_server(servicer, server) -> None:
    """The KServe v2 servicer function for the Ray proxy (see add_MoEServingServicer_to_server,
    which installs the proxy's log filter and status mapping for both)."""
    register_kserve(servicer, server)


def add_MoEServingServicer_to_server(servicer, server) -> None:
    """The servicer function the Ray proxy imports, through *this* module, which generates
    `serving/api/gen/` first. (Ray's `gRPCOptions` only logs a warning and skips a servicer
    function it cannot import, which would silently leave the service unrouted.) The proxy calls
    it in its own process when it starts its gRPC server: that is where its log filter goes too
    (serving/api/log_filters.py: no traceback per shed or invalid request), and the status of a
    request whose replica died (serving/api/proxy_status.py: UNAVAILABLE, not INTERNAL)."""
    from serving.api import log_filters, proxy_status
    log_filters.install()
    proxy_status.install()
    register_moe_serving(servicer, server)


#: `gRPCOptions(grpc_servicer_functions=SERVICER_FUNCTIONS)` for the Ray Serve proxy: the
#: proxy then routes /moe_serving.v1.MoEServing/{Generate,Complete},
#: /grpc.health.v1.Health/{Check,Watch} and /inference.GRPCInferenceService/{ServerLive, ...,
#: ModelInfer, ModelStreamInfer} to the ingress methods of the same names.
SERVICER_FUNCTIONS: list[str] = [
    "serving.api.protos.add_MoEServingServicer_to_server",
    "serving.api.protos.add_GRPCInferenceServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]

def set_guided(request: Any, kind: str, value: Any) -> None:
    """Set GenerateRequest.guided's oneof field `kind` (a GuidedDecoding field name) to `value`:
    a string, True (json_object), or a list of strings (choice)."""
    if kind == "choice":
        request.guided.choice.choices.extend(value)
    else:
        setattr(request.guided, kind, value)


__all__ = ["pb2", "pb2_grpc", "set_guided", "add_MoEServingServicer_to_server", "register_moe_serving", "register_kserve",
           "add_GRPCInferenceServiceServicer_to_server", "health_pb2",
           "health_pb2_grpc", "SERVICE_NAME", "SERVICE_NAMES", "SERVICER_FUNCTIONS"]
