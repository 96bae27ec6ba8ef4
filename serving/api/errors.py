"""Errors crossing the API boundary, and the gRPC status each one becomes.

| raised by            | exception        | gRPC status                                      |
|----------------------|------------------|--------------------------------------------------|
| validation           | InvalidRequest   | INVALID_ARGUMENT, details "<field>: <message>"   |
| deserializer, KServe | MalformedRequest | INVALID_ARGUMENT, details "request: ..." (bytes that are not a GenerateRequest), or the KServe input at fault |
| validation (guided)  | GuidedDecodingUnavailable (serving/model/guided.py) | UNIMPLEMENTED: xgrammar is not installed on the server |
| tenants (auth)       | Unauthenticated  | UNAUTHENTICATED                                  |
| tenants (quota)      | Overloaded       | RESOURCE_EXHAUSTED + `grpc-retry-pushback-ms`     |
| engine / admission   | Overloaded       | RESOURCE_EXHAUSTED + `grpc-retry-pushback-ms`     |
| engine / replica     | Draining         | UNAVAILABLE                                      |
| Ray (replica died)   | RayActorError    | UNAVAILABLE + `grpc-retry-pushback-ms` (unary)    |
| engine (shards gone) | ExpertsUnreachable | UNAVAILABLE + `grpc-retry-pushback-ms` (unary)  |
| anything else        | (any)            | INTERNAL, short message (never for user mistakes)|

`RpcAbort` is what `GenerateService.generate` raises *after* setting the status on the
gRPC context: Ray Serve's proxy only carries a code set on a streaming method to the
client when the method raises (see serving/api/service.py).
"""
from __future__ import annotations

import grpc

#: Trailing-metadata key of gRPC's retry throttling/pushback (milliseconds, as a string).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: Trailing-metadata key of the rich status (google.rpc.Status, serialized).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def retry_trailers(code: grpc.StatusCode, message: str, retry_after_ms: int) -> list[tuple[str, str | bytes]]:
    """Retry pushback for an overloaded call, both ways clients read it: gRPC's
    `grpc-retry-pushback-ms` trailer and a google.rpc.RetryInfo in the rich status details."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
        seconds=retry_after_ms // 1000, nanos=(retry_after_ms % 1000) * 1_000_000))
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return [(RETRY_PUSHBACK_KEY, str(retry_after_ms)), (STATUS_DETAILS_KEY, status.SerializeToString())]


#: How long a client is asked to wait before retrying a request whose replica died: Serve
#: routes the retry to another replica, or queues it until the dead one is replaced.
LOST_REPLICA_RETRY_MS = 1000


def is_lost_replica(exc: BaseException) -> bool:
    """The replica serving the request (or its node) died or cannot be reached: a Ray actor
    error that is not an exception our own code raised (those come wrapped in RayTaskError)."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
    return isinstance(exc, (RayActorError, ActorUnavailableError)) and not isinstance(exc, RayTaskError)


def lost_replica_details(exc: BaseException) -> str:
    return (f"the replica serving this request was lost ({type(exc).__name__}); tokens already "
            f"streamed stand, the rest was not generated; retry after {LOST_REPLICA_RETRY_MS} ms")


class InvalidRequest(ValueError):
    """The request is malformed. `field` is the proto field path, e.g. "max_tokens"."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # keep both fields across pickling (Ray ships exceptions)
        return (type(self), (self.field, self.message))


class Overloaded(Exception):
    """The cluster cannot take the request now; the client should retry after a while."""

    def __init__(self, message: str = "server overloaded", *, retry_after_s: float = 1.0):
        super().__init__(message)
        self.message = message
        self.retry_after_s = float(retry_after_s)

    def __reduce__(self):
        return (_make_overloaded, (type(self), self.message, self.retry_after_s))

    @property
    def retry_after_ms(self) -> int:
        return max(0, int(round(self.retry_after_s * 1000)))


class MalformedRequest:
    """What the servicer gets in place of a request that cannot become a GenerateRequest, so that it
    is answered INVALID_ARGUMENT (`field`: `message`) after authentication, like any invalid
    request: bytes that do not parse as the method's message (serving/api/protos.py; gRPC itself
    would answer UNKNOWN), or a KServe request whose tensors do not translate (serving/api/kserve.py).
    It has the two attributes the service reads before validating."""
    priority = 0

    def __init__(self, field: str, message: str, request_id: str = ""):
        self.field, self.message, self.request_id = field, message, request_id

    @classmethod
    def undecodable(cls, message_type: str, reason: str) -> "MalformedRequest":
        return cls("request", f"not a valid {message_type} ({reason})")

    def __reduce__(self):       # Ray's proxy pickles the request to the replica
        return (type(self), (self.field, self.message, self.request_id))


class Unauthenticated(Exception):
    """The RPC carries no bearer token, or one no tenant owns (serving/api/tenants.py)."""

    def __init__(self, message: str = "missing or unknown bearer token"):
        super().__init__(message)
        self.message = message


class Draining(Exception):
    """This replica is shutting down (or not ready); retry on another one."""

    def __init__(self, message: str = "server is draining"):
        super().__init__(message)
        self.message = message


class RpcAbort(Exception):
    """The RPC ended with a non-OK status that is already set on the gRPC context."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self):
        return (type(self), (self.code, self.details))


def _make_overloaded(cls: type, message: str, retry_after_s: float) -> Overloaded:
    return cls(message, retry_after_s=retry_after_s)
