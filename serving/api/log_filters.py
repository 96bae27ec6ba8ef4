"""Keep Ray Serve's logs free of tracebacks for requests that ended the way the API says they may.

A streaming RPC must raise to carry its status through Ray's gRPC proxy (`RpcAbort`,
serving/api/errors.py), and an engine replica behind an Ingress deployment sheds by raising
`Overloaded` through its handle. Ray Serve logs each such exception with its whole traceback,
twice: the replica ("Request failed.", `ray/serve/_private/replica.py`) and the gRPC proxy
("Request failed with user-set gRPC status code ...", `ray/serve/_private/grpc_util.py`), both on
the "ray.serve" logger. So every shed request (RESOURCE_EXHAUSTED), every request to a draining
replica (UNAVAILABLE) and every malformed one (INVALID_ARGUMENT) wrote two tracebacks: under a 10x
spike, thousands a second, from the processes that are already the busiest.

`ExpectedOutcomes` drops exactly those records. It is installed by the replicas (EngineReplica,
Ingress) and, in the proxy, by the servicer function the proxy imports
(`serving.api.protos.add_MoEServingServicer_to_server`). What stays: Ray's access-log line for each
request (with its status), our metrics (`moe_serve_requests_total{status}`), and the full
traceback of anything else, INTERNAL included.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from serving.api.errors import Draining, InvalidRequest, Overloaded, RpcAbort

SERVE_LOGGER = "ray.serve"
EXPECTED_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED})


def is_expected(exc: BaseException | None) -> bool:
    """An API outcome, not a fault: shed, draining, invalid, cancelled (also wrapped by Ray). The proxy
    sees a client's cancel of a stream as GeneratorExit ("Request failed due to unexpected error.")."""
    seen = 0
    while exc is not None and seen < 8:            # wrapped by Ray (RayTaskError.cause); bounded
        if isinstance(exc, RpcAbort):
            return exc.code in EXPECTED_CODES
        if isinstance(exc, (Overloaded, Draining, InvalidRequest)):
            return True
        if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):   # the client went away
            return True
        code = getattr(exc, "grpc_code", None)     # ray.serve.exceptions.gRPCStatusError (proxy)
        if isinstance(code, grpc.StatusCode):
            return code in EXPECTED_CODES
        exc = (getattr(exc, "original_exception", None) or getattr(exc, "cause", None)
               or exc.__cause__)
        seen += 1
    return False


class ExpectedOutcomes(logging.Filter):
    """Drops log records whose exception is an expected API outcome (see `is_expected`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_expected(record.exc_info[1]))


def install(logger_name: str = SERVE_LOGGER) -> ExpectedOutcomes:
    """Add the filter to `logger_name` in this process, once; returns the installed filter."""
    logger = logging.getLogger(logger_name)
    for f in logger.filters:
        if isinstance(f, ExpectedOutcomes):
            return f
    f = ExpectedOutcomes()
    logger.addFilter(f)
    return f
