"""The replicas' log filter: no traceback for shed / draining / invalid / cancelled requests, the full
traceback for everything else."""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from serving.api.errors import Draining, InvalidRequest, Overloaded, RpcAbort
from serving.api import log_filters
from serving.api.log_filters import ExpectedOutcomes, install, is_expected


class _Wrapped(Exception):
    """Like ray.exceptions.RayTaskError: the original exception in `.cause`."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


@pytest.mark.parametrize("exc", [
    RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "engine replica queue full; retry after 200 ms"),
    RpcAbort(grpc.StatusCode.UNAVAILABLE, "server is draining"),
    RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must be >= 1"),
    RpcAbort(grpc.StatusCode.CANCELLED, "client went away"),
    Overloaded("queue full", retry_after_s=0.2),
    Draining(),
    InvalidRequest("prompt", "must not be empty"),
    _Wrapped(Overloaded("queue full")),
    _Wrapped(_Wrapped(Draining())),
    GeneratorExit(),                     # the proxy, when a client cancels its stream
    asyncio.CancelledError(),
])
def test_api_outcomes_are_expected(exc):
    assert is_expected(exc)


class _StatusError(Exception):
    """Like ray.serve.exceptions.gRPCStatusError, as the proxy sees a streaming RPC's status."""

    def __init__(self, original: BaseException, code: grpc.StatusCode):
        super().__init__(str(original))
        self.original_exception, self.grpc_code = original, code


def test_the_proxys_status_errors():
    assert is_expected(_StatusError(RuntimeError("remote"), grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert not is_expected(_StatusError(RuntimeError("remote"), grpc.StatusCode.INTERNAL))
    from ray.serve.exceptions import gRPCStatusError       # Ray's own, as grpc_util logs it
    shed = RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full; retry after 200 ms")
    assert is_expected(gRPCStatusError(shed, code=grpc.StatusCode.RESOURCE_EXHAUSTED, details=shed.details))
    assert not is_expected(gRPCStatusError(KeyError("x"), code=grpc.StatusCode.INTERNAL, details="internal"))


def test_the_proxys_servicer_function_installs_the_filter_and_the_lost_replica_status(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from ray.serve._private import proxy

    from serving.api import protos
    monkeypatch.setattr(proxy, "get_grpc_response_status", proxy.get_grpc_response_status)
    rays = proxy.get_grpc_response_status
    serve_logger = logging.getLogger(log_filters.SERVE_LOGGER)
    before = list(serve_logger.filters)
    server = grpc.server(ThreadPoolExecutor(max_workers=1))       # never started: no port
    try:
        protos.add_MoEServingServicer_to_server(protos.pb2_grpc.MoEServingServicer(), server)
        assert any(isinstance(f, ExpectedOutcomes) for f in serve_logger.filters)
        assert proxy.get_grpc_response_status is not rays           # serving/api/proxy_status.py
    finally:
        serve_logger.filters[:] = before
        server.stop(None)


def test_faults_are_not_expected():
    assert not is_expected(None)
    assert not is_expected(RuntimeError("boom"))
    assert not is_expected(RpcAbort(grpc.StatusCode.INTERNAL, "internal error (KeyError)"))
    assert not is_expected(_Wrapped(ValueError("bad weights")))
    try:
        try:
            raise Overloaded("queue full")
        except Overloaded as inner:
            raise RuntimeError("while shedding") from inner
    except RuntimeError as chained:            # `raise ... from`: the cause decides
        assert is_expected(chained)
    loop = RuntimeError("a")
    loop.__cause__ = loop                        # a cycle ends after a bounded walk
    assert not is_expected(loop)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_installed_filter_drops_expected_tracebacks_only():
    name = "test.log_filters.serve"
    logger = logging.getLogger(name)
    handler = _Collect()
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        f = install(name)
        assert install(name) is f and sum(isinstance(x, ExpectedOutcomes) for x in logger.filters) == 1
        for exc in (RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "shed"), Overloaded("full"),
                    RuntimeError("a real bug"), RpcAbort(grpc.StatusCode.INTERNAL, "internal error")):
            try:
                raise exc
            except Exception:
                logger.exception("Request failed.")
        logger.info("Replica started.")          # no exception: always kept
        kept = [(r.getMessage(), type(r.exc_info[1]).__name__ if r.exc_info else None) for r in handler.records]
        assert kept == [("Request failed.", "RuntimeError"), ("Request failed.", "RpcAbort"),
                        ("Replica started.", None)]
        assert handler.records[1].exc_info[1].code == grpc.StatusCode.INTERNAL
    finally:
        logger.removeHandler(handler)
        logger.filters.clear()


def test_default_logger_is_ray_serves():
    assert log_filters.SERVE_LOGGER == "ray.serve"
