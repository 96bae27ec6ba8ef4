"""Tenants: bearer-token auth and per-tenant quotas (serving/api/tenants.py).

The gate alone with a fake clock, then the GenerateService behind a real grpc.aio server on
loopback (the FakeEngine of test_api_service_grpc), the client and CLI, the config and the metrics.
"""
from __future__ import annotations

import argparse
import threading
import time

import grpc
import pytest
from prometheus_client import generate_latest

from serving.api import tenants as tenants_mod
from serving.api.errors import InvalidRequest, Overloaded, Unauthenticated
from serving.api.service import GenerateService
from serving.api.tenants import TenantGate, TenantQuota, TenantsConfig, token_sha256
from serving.client import EXIT_UNAUTHENTICATED, MoEClient, add_generate_arguments, run_generate
from serving.deployments.config import AppConfig
from serving.deployments.grpc_face import request_sample
from serving.metrics import MetricsHub, MetricsReport
from test_api_service_grpc import LIMITS, TOK, WAIT_S, FakeEngine, Harness

CHAT_TOKEN, BATCH_TOKEN = "s3cret-chat", "s3cret-batch"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def gate(**kw) -> tuple[TenantGate, Clock]:
    clock = Clock()
    return TenantGate(TenantsConfig(**kw), clock), clock


# ---- identity ---------------------------------------------------------------------------------

def test_without_tokens_the_header_names_the_tenant_and_default_otherwise():
    g, _ = gate()
    assert g.identify([]) == "default"
    assert g.identify(None) == "default"
    assert g.identify([("x-moe-tenant", "chat")]) == "chat"
    assert g.identify([("X-Moe-Tenant", b"chat.v2")]) == "chat.v2"
    with pytest.raises(InvalidRequest) as ei:
        g.identify([("x-moe-tenant", "no spaces!")])
    assert ei.value.field == "x-moe-tenant" and str(ei.value).startswith("x-moe-tenant: must be")


def test_with_tokens_every_call_needs_a_known_bearer_token():
    g, _ = gate(tokens={token_sha256(CHAT_TOKEN): "chat", token_sha256(BATCH_TOKEN): "batch"})
    assert g.identify([("authorization", f"Bearer {CHAT_TOKEN}")]) == "chat"
    assert g.identify([("authorization", f"bearer {BATCH_TOKEN}")]) == "batch"
    for md in ([], [("x-moe-tenant", "chat")], [("authorization", CHAT_TOKEN)],
               [("authorization", "Basic abc")], [("authorization", "Bearer ")]):
        with pytest.raises(Unauthenticated, match="missing bearer token"):
            g.identify(md)
    with pytest.raises(Unauthenticated, match="unknown bearer token"):
        g.identify([("authorization", "Bearer guessed")])
    # the header cannot override what the token says
    assert g.identify([("authorization", f"Bearer {CHAT_TOKEN}"), ("x-moe-tenant", "batch")]) == "chat"


def test_labels_are_bounded_to_listed_tenants():
    g, _ = gate(quotas={"chat": TenantQuota(max_in_flight=1)})
    assert [g.label(t) for t in ("chat", "default", "anyone", "else")] == ["chat", "default", "other", "other"]


# ---- quotas -----------------------------------------------------------------------------------

def test_max_in_flight_caps_each_tenant_alone():
    g, _ = gate(quotas={"chat": TenantQuota(max_in_flight=2)}, in_flight_retry_s=0.75)
    r1, r2 = g.acquire("chat", 10), g.acquire("chat", 10)
    with pytest.raises(Overloaded) as ei:
        g.acquire("chat", 10)
    assert ei.value.retry_after_ms == 750 and "tenant 'chat'" in ei.value.message
    others = [g.acquire("default", 10) for _ in range(5)]   # no quota: never limited
    assert g.in_flight() == {"chat": 2, "default": 5}
    r1(0)
    r1(0)                                                      # a second release is a no-op
    assert g.in_flight()["chat"] == 1
    g.acquire("chat", 10)
    with pytest.raises(Overloaded):
        g.acquire("chat", 10)
    r2(0)
    for r in others:
        r(0)
    assert g.in_flight() == {"chat": 1, "default": 0}


def test_token_bucket_refills_at_its_rate_and_refunds_what_was_not_generated():
    g, clock = gate(quotas={"chat": TenantQuota(tokens_per_s=100, burst_tokens=200)})
    first = g.acquire("chat", 150)                             # 200 -> 50 left
    with pytest.raises(Overloaded) as ei:
        g.acquire("chat", 100)                                 # 50 short: 0.5 s at 100 tokens/s
    assert ei.value.retry_after_ms == 500 and "100 tokens/s" in ei.value.message
    clock.t += 0.5
    g.acquire("chat", 100)                                     # 100 -> 0
    with pytest.raises(Overloaded):
        g.acquire("chat", 1)
    first(120)                                                 # ended early: 120 of its tokens back
    g.acquire("chat", 120)
    with pytest.raises(Overloaded):
        g.acquire("chat", 1)
    clock.t += 100.0                                           # refills up to the burst, no further
    g.acquire("chat", 200)
    with pytest.raises(Overloaded):
        g.acquire("chat", 1)


def test_a_request_larger_than_the_bucket_is_invalid_not_overloaded():
    g, _ = gate(default_quota=TenantQuota(tokens_per_s=50))    # bucket = one second = 50 tokens
    with pytest.raises(InvalidRequest) as ei:
        g.acquire("anyone", 51)
    assert ei.value.field == "max_tokens" and "51 tokens" in str(ei.value)
    g.acquire("anyone", 50)


def test_unlisted_tenants_each_get_the_default_quota_on_their_own_account():
    g, _ = gate(default_quota=TenantQuota(max_in_flight=1))
    g.acquire("a", 1)
    g.acquire("b", 1)
    with pytest.raises(Overloaded):
        g.acquire("a", 1)


def test_idle_accounts_are_forgotten_beyond_the_cap(monkeypatch):
    monkeypatch.setattr(tenants_mod, "MAX_ACCOUNTS", 4)
    g, clock = gate(default_quota=TenantQuota(max_in_flight=1, tokens_per_s=10))
    busy = g.acquire("busy", 5)
    for name in "abc":
        g.acquire(name, 10)(10)                                # refunded: full again, idle
    g.acquire("d", 1)                                          # 5th tenant: idle full ones dropped
    assert set(g.in_flight()) == {"busy", "d"}
    with pytest.raises(Overloaded):
        g.acquire("busy", 1)                                   # in flight: kept, still counted
    busy(0)


def test_concurrent_acquires_never_exceed_the_cap():
    g, _ = gate(quotas={"chat": TenantQuota(max_in_flight=3)})
    admitted, lock = [], threading.Lock()

    def worker():
        for _ in range(200):
            try:
                release = g.acquire("chat", 1)
            except Overloaded:
                continue
            with lock:
                admitted.append(g.in_flight()["chat"])
            release(0)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert admitted and max(admitted) <= 3 and g.in_flight()["chat"] == 0


# ---- config -----------------------------------------------------------------------------------

def test_config_round_trips_through_app_config_args():
    args = {"checkpoint": "ckpt", "tenants": {
        "quotas": {"chat": {"max_in_flight": 12, "tokens_per_s": 20000, "burst_tokens": 40000}},
        "default_quota": {"max_in_flight": 8}, "tokens": {token_sha256(CHAT_TOKEN): "chat"}}}
    cfg = AppConfig.from_args(args)
    assert cfg.tenants.quotas["chat"] == TenantQuota(max_in_flight=12, tokens_per_s=20000, burst_tokens=40000)
    assert cfg.tenants.default_quota.max_in_flight == 8 and cfg.tenants.auth_required
    assert AppConfig.from_args(cfg.to_args()) == cfg
    assert AppConfig.from_args({"checkpoint": "ckpt"}).tenants is None


@pytest.mark.parametrize("block, message", [
    ({"quota": {}}, "unknown tenants keys"),
    ({"quotas": {"chat": {"max_inflight": 1}}}, "unknown keys"),
    ({"quotas": {"chat": {"max_in_flight": -1}}}, ">= 0"),
    ({"quotas": {"chat": {"burst_tokens": 10}}}, "burst_tokens needs tokens_per_s"),
    ({"quotas": {"bad name": {}}}, "tenant names"),
    ({"quotas": {"other": {}}}, "'other' is reserved"),
    ({"tokens": {"a" * 64: "unidentified"}}, "'unidentified' is reserved"),
    ({"tokens": {CHAT_TOKEN: "chat"}}, "sha256 hex"),
    ({"in_flight_retry_s": 0}, "in_flight_retry_s"),
])
def test_bad_config_is_rejected_with_the_key_named(block, message):
    with pytest.raises(ValueError, match=message):
        AppConfig.from_args({"checkpoint": "ckpt", "tenants": block})


# ---- over real gRPC (grpc.aio on loopback) ------------------------------------------------------

@pytest.fixture
def th():
    """The test_api_service_grpc harness, its service gated: two token-holding tenants, chat
    capped at 1 request in flight."""
    h = Harness()
    cfg = TenantsConfig(quotas={"chat": TenantQuota(max_in_flight=1), "batch": TenantQuota()},
                        tokens={token_sha256(CHAT_TOKEN): "chat", token_sha256(BATCH_TOKEN): "batch"},
                        in_flight_retry_s=0.3)
    h.service.tenants = TenantGate(cfg)
    try:
        yield h
    finally:
        h.close()


def test_unauthenticated_calls_are_refused_before_validation_but_health_is_open(th):
    reached, stream = [], th.engine.stream

    def counting(request):                  # every call that gets as far as the engine
        reached.append(request.request_id)
        return stream(request)
    th.engine.stream = counting
    with MoEClient(th.target, WAIT_S) as c:
        assert c.health() == "SERVING"
        for method in ("generate", "complete"):
            with pytest.raises(grpc.RpcError) as ei:
                r = getattr(c, method)(prompt="abc", max_tokens=0)     # invalid too: auth comes first
                if method == "generate":
                    list(r)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in ei.value.details()
    with MoEClient(th.target, WAIT_S, token="wrong") as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.complete(prompt="abc", max_tokens=2)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown" in ei.value.details()
    with MoEClient(th.target, WAIT_S, token=CHAT_TOKEN) as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.complete(prompt="abc", max_tokens=0)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.complete(prompt="abc", max_tokens=3).text == "abc"
    records = th.wait_records(5)
    assert [r.status for r in records] == ["UNAUTHENTICATED"] * 3 + ["INVALID_ARGUMENT", "OK"]
    assert [r.tenant for r in records] == ["unidentified"] * 3 + ["chat", "chat"]
    assert len(reached) == 1                               # only the call that passed reached the engine


def test_each_tenant_is_its_own_prefix_cache_namespace(th):
    """The engine gets the caller's tenant as the request's cache salt: two tenants sending the same
    system prompt never share cached K/V (a hit's speed would tell one the other's prompt)."""
    salts, stream = [], th.engine.stream

    def recording(request):
        salts.append(request.cache_salt)
        return stream(request)
    th.engine.stream = recording
    for token in (CHAT_TOKEN, BATCH_TOKEN, CHAT_TOKEN):
        with MoEClient(th.target, WAIT_S, token=token) as c:
            assert c.complete(prompt="abc", max_tokens=2).text == "ab"
    assert salts == ["chat", "batch", "chat"]


def test_a_tenant_at_its_cap_is_shed_while_another_tenant_is_served(th):
    with MoEClient(th.target, WAIT_S, token=CHAT_TOKEN) as chat, \
            MoEClient(th.target, WAIT_S, token=BATCH_TOKEN) as batch:
        stream = chat.generate(prompt="abc", max_tokens=20, request_id="slow-1")   # 50 ms a token
        first = next(stream)
        assert first.token_ids
        with pytest.raises(grpc.RpcError) as ei:
            chat.complete(prompt="abc", max_tokens=2)
        err = ei.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'chat'" in err.details() and "retry after 300 ms" in err.details()
        assert dict(err.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "300"
        assert batch.complete(prompt="xyz", max_tokens=3).text == "abc"     # the other tenant: served
        rest = list(stream)
        assert sum(len(ch.token_ids) for ch in [first, *rest]) == 20          # the admitted stream: whole
        assert chat.complete(prompt="abc", max_tokens=2).text == "ab"         # its slot is free again
        # a cancelled stream frees the slot too
        stream = chat.generate(prompt="abc", max_tokens=20, request_id="slow-2")
        next(stream)
        stream.close()                                     # breaking off cancels the RPC
        deadline = time.monotonic() + WAIT_S
        while th.service.tenants.in_flight()["chat"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert th.service.tenants.in_flight()["chat"] == 0
        assert chat.complete(prompt="abc", max_tokens=2).text == "ab"


def _cli(target: str, *extra: str) -> int:
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    return run_generate(p.parse_args(["--target", target, "--prompt", "abc", "--max-tokens", "2", *extra]))


def test_cli_sends_the_token_from_the_environment_and_exits_4_without_it(th, monkeypatch, capsys):
    monkeypatch.delenv("MOE_SERVE_TOKEN", raising=False)
    assert _cli(th.target) == EXIT_UNAUTHENTICATED
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("MOE_SERVE_TOKEN", BATCH_TOKEN)
    assert _cli(th.target, "--json") == 0
    monkeypatch.setenv("MY_TOKEN", CHAT_TOKEN)
    assert _cli(th.target, "--token-env", "MY_TOKEN") == 0
    assert [r.tenant for r in th.wait_records(3)] == ["unidentified", "batch", "chat"]


def test_without_tokens_the_tenant_header_applies_the_quota():
    h = Harness()
    h.service.tenants = TenantGate(TenantsConfig(default_quota=TenantQuota(tokens_per_s=30)))
    try:
        with MoEClient(h.target, WAIT_S, tenant="team-a") as a, MoEClient(h.target, WAIT_S, tenant="team-b") as b:
            assert a.complete(prompt="abcdefghij", max_tokens=10).text == "abcdefghij"   # 11 + 10 of 30
            with pytest.raises(grpc.RpcError) as ei:
                a.complete(prompt="abcdefghij", max_tokens=10)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant 'team-a'" in ei.value.details()
            assert b.complete(prompt="abcdefghij", max_tokens=10).text == "abcdefghij"   # its own bucket
            with pytest.raises(grpc.RpcError) as ei:
                a.complete(prompt="abcdefghij", max_tokens=25)          # 36 > the bucket: can never pass
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ei.value.details().startswith("max_tokens:")
        with MoEClient(h.target, WAIT_S, metadata=[("x-moe-tenant", "a b")]) as bad:
            with pytest.raises(grpc.RpcError) as ei:
                bad.complete(prompt="abc", max_tokens=2)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ei.value.details().startswith("x-moe-tenant:")
        assert _cli(h.target, "--tenant", "team-c") == 0
        # unlisted tenants share one label; a call refused before its caller is known is "unidentified"
        assert [r.tenant for r in h.wait_records(6)] == ["other"] * 4 + ["unidentified", "other"]
    finally:
        h.close()


def test_no_tenants_configured_means_no_checks():
    svc = GenerateService(TOK, LIMITS, FakeEngine())
    assert svc.tenants is None


# ---- metrics ----------------------------------------------------------------------------------

def test_hub_counts_requests_and_tokens_per_tenant(th):
    with MoEClient(th.target, WAIT_S, token=CHAT_TOKEN) as c:
        c.complete(prompt="abc", max_tokens=3)
    with MoEClient(th.target, WAIT_S) as c:
        with pytest.raises(grpc.RpcError):
            c.complete(prompt="abc", max_tokens=3)
    hub = MetricsHub()
    hub.apply(MetricsReport(reporter="r1", requests=[request_sample(r) for r in th.wait_records(2)]))
    text = generate_latest(hub.metrics.registry).decode()
    assert 'moe_serve_tenant_requests_total{status="OK",tenant="chat"} 1.0' in text
    assert 'moe_serve_tenant_requests_total{status="UNAUTHENTICATED",tenant="unidentified"} 1.0' in text
    assert 'moe_serve_tenant_tokens_total{kind="prompt",tenant="chat"} 4.0' in text        # BOS + "abc"
    assert 'moe_serve_tenant_tokens_total{kind="completion",tenant="chat"} 3.0' in text


def test_token_hash_command_reads_stdin(monkeypatch, capsys):
    import io

    from serving.cli import main
    monkeypatch.setattr("sys.stdin", io.StringIO(CHAT_TOKEN + "\n"))
    assert main(["token-hash"]) == 0
    digest = capsys.readouterr().out.strip()
    assert digest == token_sha256(CHAT_TOKEN) and len(digest) == 64
    TenantsConfig(tokens={digest: "chat"})                     # what the config accepts
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["token-hash"]) == 2


def test_a_request_refused_before_identification_is_recorded_unidentified(th):
    th.service.record_refused("ModelInfer", grpc.StatusCode.NOT_FOUND, "nf-1")
    (rec,) = th.wait_records(1)
    assert (rec.request_id, rec.status, rec.method, rec.tenant) == ("nf-1", "NOT_FOUND", "ModelInfer", "unidentified")


def test_tokenize_is_authenticated_as_generate_and_spends_no_quota(th):
    """Tokenize needs the bearer token Generate needs; with it, it answers while the tenant's one
    request in flight holds its whole quota, and is recorded as no request."""
    with MoEClient(th.target, WAIT_S) as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.tokenize(prompt="abc")
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with MoEClient(th.target, WAIT_S, token=CHAT_TOKEN) as c:
        stream = c.generate(prompt="abc", max_tokens=4, request_id="slow-1")     # chat's 1 in flight
        next(stream)
        assert list(c.tokenize(prompt="abc").token_ids) == [0, 98, 99, 100]    # BOS, bytes + 1
        assert list(stream)
    assert [r.request_id for r in th.wait_records(1)] == ["slow-1"]
