"""Every Prometheus metric of the system, defined in this one module.

Replicas do not serve metrics themselves. Each one fills a `MetricsReport` (plain data)
and sends it to the single MetricsHub (a Serve deployment wrapping `MetricsHub`), which
applies it to the families below and serves them on the metrics port. Names follow
Prometheus conventions: base units (seconds), `_total` on counters, no colons.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NAMESPACE = "moe_serve"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STALE_REPORTER_S = 15.0       # a replica silent this long loses its per-replica series (MetricsHub._drop_stale)
SHARD_LOAD_DECAY = 0.9        # per engine report: the shard-load gauge forgets old traffic
# moe_serve_model_info's labels beside `replica` (EngineSample.model): what the replica serves
MODEL_INFO_LABELS = ("model", "family", "dtype", "weights", "expert_shards", "transport")


@dataclass(slots=True)
class RequestSample:
    """One finished request, as the ingress saw it."""
    status: str                  # gRPC status code name: OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...
    priority: str                # interactive | batch
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    tenant: str = "default"      # the caller's label (serving/api/tenants.py: listed tenants, default, other,
                                 # unidentified)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class EngineSample:
    """An engine replica's gauges now, and its counter increments since its last report."""
    num_waiting: int = 0
    num_running: int = 0
    kv_slots_used: int = 0
    kv_slots_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    preemptions: int = 0                         # delta
    prompt_tokens: int = 0                       # delta
    generated_tokens: int = 0                    # delta
    prefix_query_tokens: int = 0                 # delta: tokens of joining sequences, looked up in the prefix cache
    prefix_hit_tokens: int = 0                   # delta: ... found cached
    spec_draft_tokens: int = 0                   # delta: speculative draft tokens run through the model
    spec_accepted_tokens: int = 0                # delta: ... the model agreed with
    step_seconds: list[float] = field(default_factory=list)
    routed_tokens: dict[tuple[int, int, int], int] = field(default_factory=dict)  # (layer, expert, shard) -> delta
    phase_seconds: dict[str, float] = field(default_factory=dict)     # step phase -> delta (engine/step_phases.py)
    shard_busy_seconds: dict[int, float] = field(default_factory=dict)  # shard -> delta of its compute time
    model: dict[str, str] = field(default_factory=dict)   # MODEL_INFO_LABELS -> value (moe_serve_model_info)


@dataclass(slots=True)
class MetricsReport:
    reporter: str                                # replica id
    requests: list[RequestSample] = field(default_factory=list)
    engine: EngineSample | None = None


class Metrics:
    """The metric families, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        ns = NAMESPACE
        self.requests = Counter("requests", "Requests by final gRPC status and priority class",
                                ["status", "priority"], namespace=ns, registry=r)
        self.tenant_requests = Counter("tenant_requests", "Requests by tenant (serving/api/tenants.py) and final "
                                       "gRPC status", ["tenant", "status"], namespace=ns, registry=r)
        self.tenant_tokens = Counter("tenant_tokens", "Tokens by tenant: prompt (of requests that reached the "
                                     "engine) and completion (generated)", ["tenant", "kind"],
                                     namespace=ns, registry=r)
        self.ttft = Histogram("time_to_first_token_seconds", "Time from arrival to the first token",
                              ["priority"], namespace=ns, buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("inter_token_latency_seconds", "Gap between consecutive streamed tokens",
                             namespace=ns, buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from arrival to the last token",
                             ["priority"], namespace=ns, buckets=LATENCY_BUCKETS_S, registry=r)
        self.model_info = Gauge("model_info", "What each engine replica serves (always 1): the checkpoint's "
                                "directory name, model family, serving dtype, weights on disk (float, "
                                "fp8-block<R>x<C>, fp8-tensor, mxfp4), expert shards and transport",
                                ["replica", *MODEL_INFO_LABELS], namespace=ns, registry=r)
        self.queue_depth = Gauge("queue_depth", "Requests waiting for a batch slot",
                                 ["replica"], namespace=ns, registry=r)
        self.running = Gauge("running_requests", "Requests in the running batch",
                             ["replica"], namespace=ns, registry=r)
        self.kv_used = Gauge("kv_slots_used", "KV-cache slots in use", ["replica"], namespace=ns, registry=r)
        self.kv_total = Gauge("kv_slots", "KV-cache slots", ["replica"], namespace=ns, registry=r)
        self.kv_blocks_used = Gauge("kv_blocks_used", "Paged KV-cache blocks in use", ["replica"],
                                    namespace=ns, registry=r)
        self.kv_blocks = Gauge("kv_blocks", "Paged KV-cache blocks", ["replica"], namespace=ns, registry=r)
        self.preemptions = Counter("preemptions", "Running sequences preempted (KV cache full) and recomputed later",
                                   ["replica"], namespace=ns, registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of the requests the engine took (prefix-cache "
                                     "hits included)", ["replica"], namespace=ns, registry=r)
        self.prefix_query_tokens = Counter("prefix_cache_query_tokens",
                                           "Tokens of the sequences joining the batch, looked up in the prefix cache "
                                           "(a preempted sequence counts again when it rejoins)",
                                           ["replica"], namespace=ns, registry=r)
        self.prefix_hit_tokens = Counter("prefix_cache_hit_tokens",
                                         "Of those, the tokens whose K/V were cached already (not prefilled again)",
                                         ["replica"], namespace=ns, registry=r)
        self.spec_draft_tokens = Counter("spec_decode_draft_tokens", "Speculative decoding: n-gram draft tokens "
                                         "run through the model (serving/engine/speculative.py)",
                                         ["replica"], namespace=ns, registry=r)
        self.spec_accepted_tokens = Counter("spec_decode_accepted_tokens", "Speculative decoding: draft tokens "
                                            "the model agreed with (tokens gained over one a step)",
                                            ["replica"], namespace=ns, registry=r)
        self.generated_tokens = Counter("generation_tokens", "Tokens generated",
                                        ["replica"], namespace=ns, registry=r)
        self.step = Histogram("engine_step_seconds", "Duration of one engine step",
                              ["replica"], namespace=ns, buckets=ITL_BUCKETS_S, registry=r)
        self.step_phase = Counter("engine_step_phase_seconds",
                                  "Engine step wall time by phase: schedule, dense, experts, head, sample "
                                  "(serving/engine/step_phases.py); the phases add up to the step",
                                  ["replica", "phase"], namespace=ns, registry=r)
        self.shard_busy = Counter("expert_shard_busy_seconds",
                                  "Time each expert shard of an engine replica spent computing its experts (local and "
                                  "collective transports); the engine's experts phase minus the busiest shard's is about "
                                  "what the transport costs",
                                  ["replica", "shard"], namespace=ns, registry=r)
        self.routed = Counter("expert_routed_tokens", "Tokens routed to each expert",
                              ["layer", "expert", "shard"], namespace=ns, registry=r)
        self.shard_load = Gauge("expert_shard_load_tokens", "Recent tokens routed to each shard (decayed sum)",
                                ["layer", "shard"], namespace=ns, registry=r)
        self.imbalance = Gauge("expert_shard_imbalance", "Max shard load over mean shard load, per MoE layer",
                               ["layer"], namespace=ns, registry=r)
        self.rebalance_decisions = Counter("expert_rebalance_decisions",
                                           "Automatic expert rebalancing (auto_rebalance): windows judged, by "
                                           "outcome: rebalanced | quiet | balanced | no_gain (serving/parallel/rebalance.py)",
                                           ["outcome"], namespace=ns, registry=r)
        self.placement_imbalance = Gauge("expert_placement_step_imbalance",
                                         "Automatic expert rebalancing: the placement in force over the last judged "
                                         "window, predicted: sum over layers of the busiest shard's tokens / the mean "
                                         "shard's (1 = balanced); `after`: the plan built from that window",
                                         ["placement"], namespace=ns, registry=r)
        self.placement_version = Gauge("expert_placement_version",
                                       "Version of the expert placement in force (0: the deployed one; bumped by "
                                       "every rebalance, automatic or `moe-serve placement --apply`), as automatic "
                                       "rebalancing last read it: exported while auto_rebalance is on",
                                       namespace=ns, registry=r)
        self.desired_replicas = Gauge("autoscaling_desired_replicas", "Replicas the autoscaling policy asks for",
                                      ["deployment"], namespace=ns, registry=r)
        self.replicas = Gauge("deployment_replicas", "Running replicas when the policy last decided",
                              ["deployment"], namespace=ns, registry=r)
        self.decisions = Counter("autoscaling_decisions", "Autoscaling policy decisions by reason",
                                 ["deployment", "reason"], namespace=ns, registry=r)


# ---- autoscaling decisions: taken inside the Serve controller, published through Ray's GCS KV ----
AUTOSCALING_KV_NAMESPACE = "moe_serve"
AUTOSCALING_KV_PREFIX = "autoscaling:"
_decision_lock = threading.Lock()
_decision_counts: dict[str, dict[str, int]] = {}    # deployment -> reason -> decisions (this process)
_decision_published: dict[str, tuple[float, int]] = {}


def record_autoscaling_decision(deployment: str, desired: int, current: int, reason: str) -> None:
    """The policies' `on_decision` hook (runs in the Serve controller, every policy tick).

    It counts decisions by reason and publishes a snapshot to Ray's GCS key-value store,
    from which the MetricsHub exports them; at most every 0.25 s unless `desired` changes.
    """
    now = time.monotonic()
    with _decision_lock:
        counts = _decision_counts.setdefault(deployment, {})
        counts[reason] = counts.get(reason, 0) + 1
        last_t, last_desired = _decision_published.get(deployment, (-1e9, -1))
        if now - last_t < 0.25 and desired == last_desired:
            return
        _decision_published[deployment] = (now, desired)
        snapshot = json.dumps({"deployment": deployment, "desired": desired, "current": current,
                               "reason": reason, "counts": dict(counts)})
    from ray.experimental.internal_kv import _internal_kv_put
    _internal_kv_put(AUTOSCALING_KV_PREFIX + deployment, snapshot, namespace=AUTOSCALING_KV_NAMESPACE)


class MetricsHub:
    """Applies reports from every replica to one `Metrics` (the plain object behind the hub)."""

    def __init__(self, metrics: Metrics | None = None):
        self.metrics = metrics or Metrics()
        self._last_seen: dict[str, float] = {}
        self._decisions_seen: dict[tuple[str, str], int] = {}
        self._shard_load: dict[int, dict[int, float]] = {}     # layer -> shard -> decayed tokens
        self._replica_series: dict[str, set[tuple]] = {}        # replica -> (metric, label values) it has

    def apply_autoscaling(self, snapshot: dict) -> None:
        """One deployment's latest decision snapshot (see record_autoscaling_decision)."""
        m, dep = self.metrics, snapshot["deployment"]
        m.desired_replicas.labels(dep).set(snapshot["desired"])
        m.replicas.labels(dep).set(snapshot["current"])
        for reason, total in snapshot["counts"].items():
            seen = self._decisions_seen.get((dep, reason), 0)
            delta = total - seen if total >= seen else total     # the controller restarted
            if delta:
                m.decisions.labels(dep, reason).inc(delta)
            self._decisions_seen[(dep, reason)] = total

    def routed_load(self, num_experts: int) -> dict[int, list[float]]:
        """layer -> tokens routed to each expert so far, every shard and engine replica together
        (what automatic rebalancing judges: serving/parallel/rebalance.py)."""
        return observed_expert_load(generate_latest(self.metrics.registry).decode(), num_experts)

    def apply_rebalance(self, decision, version: int) -> None:
        """One automatic-rebalancing window judged (a rebalance.RebalanceDecision), and the version
        of the placement in force after it."""
        m = self.metrics
        m.rebalance_decisions.labels(decision.reason).inc()
        if decision.reason != "quiet":
            m.placement_imbalance.labels("current").set(decision.before)
            m.placement_imbalance.labels("after").set(decision.after)
        m.placement_version.set(version)

    def apply(self, report: MetricsReport) -> None:
        m = self.metrics
        for rq in report.requests:
            m.requests.labels(rq.status, rq.priority).inc()
            m.tenant_requests.labels(rq.tenant, rq.status).inc()
            if rq.completion_tokens:
                m.tenant_tokens.labels(rq.tenant, "prompt").inc(rq.prompt_tokens)
                m.tenant_tokens.labels(rq.tenant, "completion").inc(rq.completion_tokens)
            if rq.ttft_s is not None:
                m.ttft.labels(rq.priority).observe(rq.ttft_s)
            for gap in rq.itl_s:
                m.itl.observe(gap)
            if rq.e2e_s is not None:
                m.e2e.labels(rq.priority).observe(rq.e2e_s)
        e = report.engine
        if e is not None:
            rid = report.reporter
            mine = self._of(rid)
            if e.model:
                mine(m.model_info, *(e.model.get(k, "") for k in MODEL_INFO_LABELS)).set(1)
            mine(m.queue_depth).set(e.num_waiting)
            mine(m.running).set(e.num_running)
            mine(m.kv_used).set(e.kv_slots_used)
            mine(m.kv_total).set(e.kv_slots_total)
            mine(m.kv_blocks_used).set(e.kv_blocks_used)
            mine(m.kv_blocks).set(e.kv_blocks_total)
            mine(m.preemptions).inc(e.preemptions)
            mine(m.prompt_tokens).inc(e.prompt_tokens)
            mine(m.generated_tokens).inc(e.generated_tokens)
            mine(m.prefix_query_tokens).inc(e.prefix_query_tokens)
            mine(m.prefix_hit_tokens).inc(e.prefix_hit_tokens)
            mine(m.spec_draft_tokens).inc(e.spec_draft_tokens)
            mine(m.spec_accepted_tokens).inc(e.spec_accepted_tokens)
            step = mine(m.step)
            for dt in e.step_seconds:
                step.observe(dt)
            for phase, seconds in e.phase_seconds.items():
                if seconds > 0:
                    mine(m.step_phase, phase).inc(seconds)
            for shard, seconds in e.shard_busy_seconds.items():
                if seconds > 0:
                    mine(m.shard_busy, str(shard)).inc(seconds)
            for (layer, expert, shard), n in e.routed_tokens.items():
                m.routed.labels(str(layer), str(expert), str(shard)).inc(n)
            self._update_shard_load(e.routed_tokens)
            self._last_seen[rid] = time.monotonic()
        self._drop_stale()

    def _update_shard_load(self, routed: dict[tuple[int, int, int], int]) -> None:
        """Decay every shard's recent load (half-life ~7 reports), add the new tokens, and
        export the load and the per-layer imbalance (max / mean over shards)."""
        for per_shard in self._shard_load.values():
            for shard in per_shard:
                per_shard[shard] *= SHARD_LOAD_DECAY
        for (layer, _expert, shard), n in routed.items():
            per_shard = self._shard_load.setdefault(layer, {})
            per_shard[shard] = per_shard.get(shard, 0.0) + n
        for layer, per_shard in self._shard_load.items():
            for shard, load in per_shard.items():
                self.metrics.shard_load.labels(str(layer), str(shard)).set(load)
            mean = sum(per_shard.values()) / len(per_shard)
            if mean > 0:
                self.metrics.imbalance.labels(str(layer)).set(max(per_shard.values()) / mean)

    def _of(self, rid: str):
        """metric, *labels -> that metric's child for replica `rid` (its first label), remembered so
        that the replica's series can all be removed once it stops reporting."""
        series = self._replica_series.setdefault(rid, set())

        def child(metric, *labels: str):
            series.add((metric, labels))
            return metric.labels(rid, *labels)
        return child

    def _drop_stale(self) -> None:
        """A replica silent for STALE_REPORTER_S (scaled down, or dead) loses every series labelled
        with it: its gauges would otherwise hold their last values forever, and with replicas
        coming and going the per-replica counters would pile up. Prometheus's rate() and sum()
        treat a counter series that ends like a replica that went away."""
        now = time.monotonic()
        for rid in [r for r, t in self._last_seen.items() if now - t > STALE_REPORTER_S]:
            del self._last_seen[rid]
            for metric, labels in self._replica_series.pop(rid, ()):
                metric.remove(rid, *labels)


def observed_expert_load(exposition: str, num_experts: int) -> dict[int, list[float]]:
    """layer -> tokens routed to each expert (all shards), parsed from a scrape of the hub."""
    prefix = f"{NAMESPACE}_expert_routed_tokens_total{{"
    load: dict[int, list[float]] = {}
    for line in exposition.splitlines():
        if not line.startswith(prefix):
            continue
        labels, value = line[len(prefix):].rsplit("} ", 1)
        kv = dict(part.split("=", 1) for part in labels.split(","))
        layer, expert = int(kv["layer"].strip('"')), int(kv["expert"].strip('"'))
        load.setdefault(layer, [0.0] * num_experts)[expert] += float(value)
    return load
