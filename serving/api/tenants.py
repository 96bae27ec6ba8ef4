"""Tenants: who is calling (bearer-token auth), and how much of a replica each caller may hold (quotas).

Internal services share one endpoint. Without quotas, the service whose traffic spikes takes every
KV slot and queue place, and the others are shed along with it. A tenant's quota bounds, on each
replica that serves the gRPC API (the engine replica, or the Ingress deployment's replica):

  max_in_flight   its requests admitted and not yet finished (streams in progress and queued)
  tokens_per_s    the tokens it may start per second, each request costing prompt + max_tokens
                  (a token bucket of depth `burst_tokens`; what a request did not generate is refunded)

A request over its tenant's quota gets RESOURCE_EXHAUSTED with retry pushback before it reaches the
engine: the bucket's refill time for that request, or `in_flight_retry_s` for concurrency. Other
tenants are not affected. A request that costs more than its tenant's whole bucket could never pass:
it gets INVALID_ARGUMENT naming `max_tokens`.

Identity: with `tokens` configured (sha256 hex of each bearer token -> tenant), every RPC except the
health check must carry `authorization: Bearer <token>`; a missing or unknown token is
UNAUTHENTICATED, checked before anything else of the request is read. Without tokens, the caller
names itself in the `x-moe-tenant` metadata (trusted: an internal network), and a request without it
belongs to tenant "default".

Quotas are per replica, like Envoy's local rate limit: with R replicas serving the API a tenant may
hold up to R times its quota across the cluster. Tenants that are not listed share `default_quota`
(each on its own account). Metric labels name the tenants the config names (a quota or a token) and
"default"; any other is "other", and a call refused before its caller is known (UNAUTHENTICATED, a
malformed x-moe-tenant) is "unidentified", so label cardinality stays bounded.

Shape of the `tenants:` block of the Serve config's application args (cluster/serve_config.yaml):

    tenants:
      default_quota: {max_in_flight: 8}
      quotas:
        chat: {max_in_flight: 12, tokens_per_s: 20000, burst_tokens: 40000}
        nightly-batch: {max_in_flight: 2}
      tokens: {<sha256 hex of chat's token>: chat}   # optional; `moe-serve token-hash` prints one
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from serving.api.errors import InvalidRequest, Overloaded, Unauthenticated

TENANT_HEADER = "x-moe-tenant"
AUTH_HEADER = "authorization"
DEFAULT_TENANT = "default"
OTHER_LABEL = "other"
UNIDENTIFIED_LABEL = "unidentified"   # the metric label of a call refused before its caller was known
MAX_TENANT_NAME = 64
MAX_ACCOUNTS = 4096          # tenants tracked at once; idle ones with a full bucket are dropped beyond it


def token_sha256(token: str) -> str:
    """What the config stores for a bearer token: its sha256, hex (the token itself is never stored)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True, slots=True)
class TenantQuota:
    max_in_flight: int = 0           # requests admitted and unfinished on one replica (0 = no limit)
    tokens_per_s: float = 0.0        # prompt + max_tokens started per second on one replica (0 = no limit)
    burst_tokens: int = 0            # the bucket's depth (0 = one second of tokens_per_s)

    def __post_init__(self) -> None:
        if self.max_in_flight < 0 or self.tokens_per_s < 0 or self.burst_tokens < 0:
            raise ValueError(f"tenant quota values must be >= 0, got {self}")
        if self.burst_tokens and not self.tokens_per_s:
            raise ValueError("burst_tokens needs tokens_per_s")

    @property
    def bucket_tokens(self) -> float:
        return float(self.burst_tokens or self.tokens_per_s)


@dataclass(frozen=True, kw_only=True, slots=True)
class TenantsConfig:
    quotas: Mapping[str, TenantQuota] = field(default_factory=dict)   # tenant -> its quota
    default_quota: TenantQuota = TenantQuota()                          # every tenant not listed
    tokens: Mapping[str, str] = field(default_factory=dict)            # sha256(bearer token) -> tenant
    in_flight_retry_s: float = 0.5   # pushback for a tenant at max_in_flight (a slot frees when one ends)

    def __post_init__(self) -> None:
        for digest, tenant in self.tokens.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"tenants.tokens keys must be sha256 hex digests (64 lowercase hex "
                                 f"characters; `moe-serve token-hash` prints one), got {digest[:12]!r}...")
            _check_name(tenant, configured=True)
        for tenant in self.quotas:
            _check_name(tenant, configured=True)
        if self.in_flight_retry_s <= 0:
            raise ValueError(f"in_flight_retry_s must be > 0, got {self.in_flight_retry_s}")

    @property
    def auth_required(self) -> bool:
        return bool(self.tokens)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TenantsConfig":
        """The `tenants:` block of the Serve config (or `to_dict`'s output); unknown keys are errors."""
        known = {"quotas", "default_quota", "tokens", "in_flight_retry_s"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown tenants keys {unknown}; known: {sorted(known)}")
        quotas = {str(name): _quota(q, f"tenants.quotas.{name}") for name, q in (d.get("quotas") or {}).items()}
        return cls(quotas=quotas, default_quota=_quota(d.get("default_quota") or {}, "tenants.default_quota"),
                   tokens={str(k): str(v) for k, v in (d.get("tokens") or {}).items()},
                   in_flight_retry_s=float(d.get("in_flight_retry_s", 0.5)))

    def to_dict(self) -> dict:
        def q(x: TenantQuota) -> dict:
            return {"max_in_flight": x.max_in_flight, "tokens_per_s": x.tokens_per_s, "burst_tokens": x.burst_tokens}
        return {"quotas": {k: q(v) for k, v in self.quotas.items()}, "default_quota": q(self.default_quota),
                "tokens": dict(self.tokens), "in_flight_retry_s": self.in_flight_retry_s}


def _check_name(tenant: str, *, configured: bool = False) -> None:
    if not tenant or len(tenant) > MAX_TENANT_NAME or not all(c.isalnum() or c in "-_." for c in tenant):
        raise ValueError(f"tenant names are 1-{MAX_TENANT_NAME} of [A-Za-z0-9-_.], got {tenant!r}")
    if configured and tenant in (OTHER_LABEL, UNIDENTIFIED_LABEL):
        raise ValueError(f"tenant name {tenant!r} is reserved: it is a metric label of its own")


def _quota(d: Mapping, where: str) -> TenantQuota:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping, got {d!r}")
    known = {"max_in_flight", "tokens_per_s", "burst_tokens"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; known: {sorted(known)}")
    return TenantQuota(**d)


class _Account:
    """One tenant's use of this replica: requests in flight, and its token bucket."""
    __slots__ = ("quota", "in_flight", "level", "refilled")

    def __init__(self, quota: TenantQuota, now: float):
        self.quota, self.in_flight = quota, 0
        self.level, self.refilled = quota.bucket_tokens, now

    def refill(self, now: float) -> None:
        q = self.quota
        self.level = min(q.bucket_tokens, self.level + (now - self.refilled) * q.tokens_per_s)
        self.refilled = now


Release = Callable[[int], None]      # release(tokens not used) ends a lease, refunding that many


class TenantGate:
    """Thread-safe. `identify` names the caller of an RPC from its metadata; `acquire` takes a lease on
    the caller's quota for one request or raises Overloaded / InvalidRequest."""

    def __init__(self, config: TenantsConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._named = {DEFAULT_TENANT, *config.quotas, *config.tokens.values()}

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The tenant of an RPC. With tokens configured: the bearer token's tenant, else Unauthenticated.
        Without: `x-moe-tenant` (checked as a name), or "default"."""
        md = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in (metadata or ())}
        if self.config.auth_required:
            auth = md.get(AUTH_HEADER, "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated(f"missing bearer token: send metadata '{AUTH_HEADER}: Bearer <token>'")
            tenant = self.config.tokens.get(token_sha256(token.strip()))
            if tenant is None:
                raise Unauthenticated("unknown bearer token")
            return tenant
        tenant = md.get(TENANT_HEADER, "").strip() or DEFAULT_TENANT
        try:
            _check_name(tenant)
        except ValueError as e:
            raise InvalidRequest(TENANT_HEADER, str(e).replace("tenant names are", "must be")) from None
        return tenant

    def label(self, tenant: str) -> str:
        """The tenant's metric label: the tenants the config names (a quota or a token) and "default"
        by name, any other as "other"."""
        return tenant if tenant in self._named else OTHER_LABEL

    def quota(self, tenant: str) -> TenantQuota:
        return self.config.quotas.get(tenant, self.config.default_quota)

    def acquire(self, tenant: str, cost_tokens: int) -> Release:
        """Count one request of `cost_tokens` (prompt + max_tokens) against the tenant's quota."""
        quota = self.quota(tenant)
        if quota.tokens_per_s and cost_tokens > quota.bucket_tokens:
            raise InvalidRequest("max_tokens", f"prompt + max_tokens = {cost_tokens} tokens is more than tenant "
                                 f"{tenant!r} may start at once ({int(quota.bucket_tokens)}); lower max_tokens")
        with self._lock:
            now = self.clock()
            acct = self._accounts.get(tenant)
            if acct is None:
                if len(self._accounts) >= MAX_ACCOUNTS:
                    self._prune(now)
                acct = self._accounts[tenant] = _Account(quota, now)
            if quota.max_in_flight and acct.in_flight >= quota.max_in_flight:
                raise Overloaded(f"tenant {tenant!r} is at its quota of {quota.max_in_flight} requests in flight "
                                 f"on this replica", retry_after_s=self.config.in_flight_retry_s)
            if quota.tokens_per_s:
                acct.refill(now)
                if acct.level < cost_tokens:
                    wait_s = (cost_tokens - acct.level) / quota.tokens_per_s
                    raise Overloaded(f"tenant {tenant!r} is over its quota of {quota.tokens_per_s:g} tokens/s "
                                     f"on this replica", retry_after_s=wait_s)
                acct.level -= cost_tokens
            acct.in_flight += 1
        released = False

        def release(unused_tokens: int = 0) -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                acct.in_flight -= 1
                if quota.tokens_per_s and unused_tokens > 0:
                    acct.refill(self.clock())
                    acct.level = min(quota.bucket_tokens, acct.level + unused_tokens)
        return release

    def _prune(self, now: float) -> None:
        """Forget idle tenants whose bucket is full again: they are as if never seen."""
        for name, a in list(self._accounts.items()):
            a.refill(now)
            if a.in_flight == 0 and a.level >= a.quota.bucket_tokens:
                del self._accounts[name]

    def in_flight(self) -> dict[str, int]:
        """tenant -> requests it holds on this replica now (tenants seen so far)."""
        with self._lock:
            return {t: a.in_flight for t, a in self._accounts.items()}
