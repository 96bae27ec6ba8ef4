"""A request whose replica died gets UNAVAILABLE with our message, not Ray's INTERNAL
(serving/api/proxy_status.py in the gRPC proxy; serving/api/service.py behind an Ingress).
The end-to-end check, a real engine replica killed mid-stream, is in tests/test_cluster_e2e.py."""
from __future__ import annotations

import grpc
import pytest
from ray import exceptions as rex
from ray.serve._private import proxy

from serving.api import proxy_status
from serving.api.errors import LOST_REPLICA_RETRY_MS, RETRY_PUSHBACK_KEY, is_lost_replica
from serving.api.service import _failure_for
from serving.engine.async_engine import ExpertsUnreachable


@pytest.fixture
def patched(monkeypatch):
    """install() on Ray's proxy module; monkeypatch puts Ray's function back afterwards."""
    monkeypatch.setattr(proxy, "get_grpc_response_status", proxy.get_grpc_response_status)
    original = proxy.get_grpc_response_status
    assert proxy_status.install()
    return original


def _wrapped_task_error() -> BaseException:
    """What our own code's failure looks like through Ray: RayTaskError whose cause is an actor error."""
    return rex.RayTaskError("generate", "Traceback ...", rex.ActorDiedError()).as_instanceof_cause()


def test_lost_replica_is_told_apart_from_our_own_errors():
    assert is_lost_replica(rex.ActorDiedError()) and is_lost_replica(rex.ActorUnavailableError("x", b"1" * 16))
    assert not is_lost_replica(_wrapped_task_error())
    assert not is_lost_replica(ValueError("bug")) and not is_lost_replica(TimeoutError())


@pytest.mark.parametrize("exc", [rex.ActorDiedError(), rex.ActorUnavailableError("node gone", b"1" * 16)])
def test_proxy_answers_unavailable_for_a_dead_replica(patched, exc):
    status = proxy.get_grpc_response_status(exc, None, "req-1")
    assert status.code == grpc.StatusCode.UNAVAILABLE and status.is_error
    assert type(exc).__name__ in status.message and f"retry after {LOST_REPLICA_RETRY_MS} ms" in status.message


def test_proxy_keeps_rays_mapping_for_everything_else(patched):
    assert proxy.get_grpc_response_status(_wrapped_task_error(), None, "r").code == grpc.StatusCode.INTERNAL
    assert proxy.get_grpc_response_status(ValueError("bug"), None, "r").code == grpc.StatusCode.INTERNAL
    assert proxy.get_grpc_response_status(TimeoutError(), 5.0, "r").code == grpc.StatusCode.DEADLINE_EXCEEDED
    # the same results Ray's own function gives
    for exc in (_wrapped_task_error(), ValueError("bug"), TimeoutError()):
        assert proxy.get_grpc_response_status(exc, 5.0, "r").code == patched(exc, 5.0, "r").code


def test_install_is_idempotent(patched):
    ours = proxy.get_grpc_response_status
    assert ours is not patched
    assert proxy_status.install() and proxy.get_grpc_response_status is ours      # not wrapped twice


def test_an_ingress_whose_engine_replica_died_answers_unavailable_with_pushback():
    failure = _failure_for(rex.ActorDiedError(), "req-9")
    assert failure.code == grpc.StatusCode.UNAVAILABLE and "ActorDiedError" in failure.details
    assert (RETRY_PUSHBACK_KEY, str(LOST_REPLICA_RETRY_MS)) in failure.trailers
    assert _failure_for(_wrapped_task_error(), "req-9").code == grpc.StatusCode.INTERNAL
    # the engine replica gave up on its shards: through the handle it arrives wrapped, still UNAVAILABLE
    gone = rex.RayTaskError("generate", "Traceback ...",
                            ExpertsUnreachable("engine step failing for 61s: x")).as_instanceof_cause()
    assert _failure_for(gone, "req-9").code == grpc.StatusCode.UNAVAILABLE
