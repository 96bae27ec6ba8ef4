"""Grafana dashboards for moe-serve, generated from this one source so they never drift.

    python -m serving.monitoring --out monitoring/grafana      # (re)write overview/experts/autoscaling.json
    python -m serving.monitoring --check monitoring/grafana    # exit 1 if the committed JSON is stale

Every raw metric named here is defined in `serving/metrics.py`; the `level:metric:op` series
are recording rules in `monitoring/rules/moe_serve_rules.yml`. tests/test_monitoring.py checks
both, and runs every expression below against a real Prometheus scraping a real MetricsHub.

Dashboards take their datasource from `${DS_PROMETHEUS}`: an import input (`__inputs`) and a
datasource template variable of the same name, so they work both imported and provisioned.
Template variables: `$job` everywhere, `$layer` (experts), `$deployment` (autoscaling).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.metrics import MODEL_INFO_LABELS

SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
J = 'job=~"$job"'                              # every selector carries the job filter
RI = "$__rate_interval"
AVAILABILITY_SLO = 0.999                       # keep in step with monitoring/rules/moe_serve_rules.yml
TTFT_SLO = 0.99
TTFT_SLO_BUCKET_S = "2.5"                      # an le of serving.metrics.LATENCY_BUCKETS_S
ERROR_STATUSES = "INTERNAL|UNKNOWN|UNAVAILABLE"
ENGINE_TARGET_ONGOING = 12                     # cluster/serve_config.yaml target_ongoing_per_replica
SHARD_TARGET_TOKENS_S = 400                    # cluster/serve_config.yaml target_tokens_per_s_per_replica


# ---------------------------------------------------------------- panel builders
@dataclass(slots=True)
class Target:
    expr: str
    legend: str = "__auto"
    instant: bool = False
    fmt: str = "time_series"                   # time_series | table | heatmap


def _targets(targets: list[Target]) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(targets):
        out.append({"datasource": DS, "editorMode": "code", "expr": t.expr, "format": t.fmt,
                    "instant": t.instant, "range": not t.instant, "legendFormat": t.legend,
                    "refId": chr(ord("A") + i)})
    return out


def _thresholds(steps: list[tuple[float | None, str]]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def timeseries(title: str, targets: list[Target], *, unit: str = "short", desc: str = "",
               stack: bool = False, steps: list[tuple[float | None, str]] | None = None,
               step_line: bool = False, min0: bool = True, overrides: list | None = None,
               w: int = 12, h: int = 8, repeat: str | None = None) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 60,
                              "showPoints": "never", "spanNulls": False,
                              "lineInterpolation": "stepAfter" if step_line else "linear",
                              "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                              "thresholdsStyle": {"mode": "line" if steps else "off"}}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom,
                                "color": {"mode": "palette-classic"},
                                "thresholds": _thresholds(steps or [(None, "green")])}
    if min0:
        defaults["min"] = 0
    p = {"type": "timeseries", "title": title, "description": desc, "datasource": DS,
         "targets": _targets(targets), "w": w, "h": h,
         "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
         "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                     "tooltip": {"mode": "multi", "sort": "desc"}}}
    if repeat:
        p.update(repeat=repeat, repeatDirection="h", maxPerRow=4)
    return p


def stat(title: str, target: Target, *, unit: str = "short", desc: str = "", decimals: int | None = None,
         steps: list[tuple[float | None, str]] | None = None, w: int = 4, h: int = 4) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"},
                                "thresholds": _thresholds(steps or [(None, "green")])}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {"type": "stat", "title": title, "description": desc, "datasource": DS,
            "targets": _targets([target]), "w": w, "h": h,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "area", "justifyMode": "auto",
                        "orientation": "auto", "textMode": "auto"}}


def heatmap(title: str, target: Target, *, desc: str = "", unit: str = "short", y_unit: str = "short",
            w: int = 12, h: int = 8, repeat: str | None = None) -> dict[str, Any]:
    p = {"type": "heatmap", "title": title, "description": desc, "datasource": DS,
         "targets": _targets([target]), "w": w, "h": h,
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left", "unit": y_unit},
                     "rowsFrame": {"layout": "auto"}, "color": {"mode": "scheme", "scheme": "Oranges",
                                                                "exponent": 0.5, "steps": 64},
                     "tooltip": {"show": True, "yHistogram": False}, "legend": {"show": True}}}
    if repeat:
        p.update(repeat=repeat, repeatDirection="h", maxPerRow=2)
    return p


def bargauge(title: str, target: Target, *, unit: str = "short", desc: str = "", w: int = 12, h: int = 8,
             repeat: str | None = None) -> dict[str, Any]:
    p = {"type": "bargauge", "title": title, "description": desc, "datasource": DS,
         "targets": _targets([target]), "w": w, "h": h,
         "fieldConfig": {"defaults": {"unit": unit, "min": 0, "color": {"mode": "continuous-GrYlRd"},
                                      "thresholds": _thresholds([(None, "green")])}, "overrides": []},
         "options": {"orientation": "vertical", "displayMode": "gradient", "showUnfilled": True,
                     "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}}
    if repeat:
        p.update(repeat=repeat, repeatDirection="h", maxPerRow=2)
    return p


def table(title: str, target: Target, *, desc: str = "", w: int = 12, h: int = 8) -> dict[str, Any]:
    return {"type": "table", "title": title, "description": desc, "datasource": DS,
            "targets": _targets([target]), "w": w, "h": h,
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}]},
            "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]}


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "w": 24, "h": 1}


def _right_axis(name_regex: str) -> list[dict[str, Any]]:
    return [{"matcher": {"id": "byRegexp", "options": name_regex},
             "properties": [{"id": "custom.axisPlacement", "value": "right"},
                            {"id": "custom.lineInterpolation", "value": "stepAfter"},
                            {"id": "custom.lineWidth", "value": 2}]}]


# ---------------------------------------------------------------- dashboard skeleton
@dataclass(slots=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[dict[str, Any]]
    variables: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "",
                          "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
            "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
                           {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}]
                          + [{"type": "panel", "id": t, "name": t, "version": ""}
                             for t in sorted({p["type"] for p in self.panels if p["type"] != "row"})],
            "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                      "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                      "name": "Annotations & Alerts", "type": "dashboard"},
                                     {"datasource": DS, "enable": True, "iconColor": "red",
                                      "name": "moe-serve alerts firing", "titleFormat": "{{alertname}}",
                                      "expr": f'ALERTS{{alertstate="firing",{J}}}', "step": "60s",
                                      "textFormat": "{{severity}} {{alertname}}", "useValueForTime": False}]},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": [{"type": "dashboards", "tags": ["moe-serve"], "asDropdown": False, "title": "moe-serve",
                       "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False,
                       "tooltip": "", "url": ""}],
            "panels": _layout(self.panels),
            "refresh": "10s",
            "schemaVersion": SCHEMA_VERSION,
            "tags": ["moe-serve"],
            "templating": {"list": [_ds_variable(), _query_variable("job", "label_values(moe_serve_requests_total, job)",
                                                                    label="job")] + self.variables},
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
            "weekStart": "",
        }


def _ds_variable() -> dict[str, Any]:
    return {"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
            "regex": "", "skipUrlSync": False}


def _query_variable(name: str, query: str, *, label: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "definition": query, "query": {"query": query, "refId": f"{name}-var"},
            "current": {}, "hide": 0, "includeAll": True, "allValue": ".*", "multi": True, "options": [],
            "refresh": 2, "regex": "", "skipUrlSync": False, "sort": 3}


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Left-to-right, top-to-bottom on Grafana's 24-column grid; ids in order."""
    out, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(panels, start=1):
        p = dict(p)
        w, h = p.pop("w"), p.pop("h")
        if p["type"] == "row" or x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["id"] = i
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        out.append(p)
        if p["type"] == "row":
            y += h
        else:
            x, row_h = x + w, max(row_h, h)
    return out


def _quantiles(metric: str, by: str, legend_by: str = "", qs: tuple[float, ...] = (0.5, 0.99)) -> list[Target]:
    """The quantiles `qs` (p50 and p99) of a histogram, per `by` label(s)."""
    grp = f"le, {by}" if by else "le"
    sfx = f" {{{{{legend_by}}}}}" if legend_by else ""
    return [Target(f"histogram_quantile({q}, sum by ({grp}) (rate({metric}_bucket{{{J}}}[{RI}])))", f"p{int(q * 100)}{sfx}")
            for q in qs]


# ---------------------------------------------------------------- the three dashboards
def overview() -> Dashboard:
    avail_budget, ttft_budget = 1 - AVAILABILITY_SLO, 1 - TTFT_SLO
    req = "moe_serve_requests_total"
    panels = [
        row("SLOs (30-day targets: availability 99.9%, interactive TTFT <= 2.5 s for 99%)"),
        stat("Availability, last 1h", Target(f"1 - job:moe_serve_availability_errors:ratio_rate1h{{{J}}}"),
             unit="percentunit", decimals=3, steps=[(None, "red"), (AVAILABILITY_SLO, "green")],
             desc="Admitted requests not failing with INTERNAL/UNKNOWN/UNAVAILABLE. RESOURCE_EXHAUSTED sheds "
                  "are excluded (see the shed ratio)."),
        stat("Availability burn rate (1h)",
             Target(f"job:moe_serve_availability_errors:ratio_rate1h{{{J}}} / {avail_budget:g}"),
             decimals=1, steps=[(None, "green"), (6, "orange"), (14.4, "red")],
             desc="Error-budget burn rate: 1 spends exactly the 30-day budget; 14.4 pages (with the 5m window)."),
        stat(f"Interactive TTFT <= {TTFT_SLO_BUCKET_S} s, last 1h",
             Target(f"1 - job:moe_serve_ttft_slo_misses:ratio_rate1h{{{J}}}"),
             unit="percentunit", decimals=2, steps=[(None, "red"), (TTFT_SLO, "green")]),
        stat("TTFT burn rate (1h)", Target(f"job:moe_serve_ttft_slo_misses:ratio_rate1h{{{J}}} / {ttft_budget:g}"),
             decimals=1, steps=[(None, "green"), (6, "orange"), (14.4, "red")]),
        stat("Shed ratio (5m)", Target(f"job:moe_serve_requests_shed:ratio_rate5m{{{J}}}"), unit="percentunit",
             decimals=2, steps=[(None, "green"), (0.01, "orange"), (0.1, "red")],
             desc="RESOURCE_EXHAUSTED / all requests: admission control rejecting load."),
        stat("Alerts firing", Target(f'count(ALERTS{{alertstate="firing",{J}}}) or vector(0)'),
             steps=[(None, "green"), (1, "red")]),

        row("Traffic"),
        timeseries("Request rate by status", [Target(f"sum by (status) (rate({req}{{{J}}}[{RI}]))", "{{status}}")],
                   unit="reqps", stack=True, w=8),
        timeseries("Request rate by priority",
                   [Target(f"sum by (priority) (rate({req}{{{J}}}[{RI}]))", "{{priority}}")], unit="reqps", w=8),
        timeseries("Error ratio and shed ratio", [
            Target(f'(sum(rate({req}{{{J},status=~"{ERROR_STATUSES}"}}[{RI}])) or vector(0)) '
                   f'/ sum(rate({req}{{{J},status!="RESOURCE_EXHAUSTED"}}[{RI}]))', "availability errors"),
            Target(f'(sum by (priority) (rate({req}{{{J},status="RESOURCE_EXHAUSTED"}}[{RI}])) '
                   f'or sum by (priority) (rate({req}{{{J}}}[{RI}])) * 0) '
                   f'/ sum by (priority) (rate({req}{{{J}}}[{RI}]))', "shed {{priority}}"),
        ], unit="percentunit", steps=[(None, "green"), (avail_budget * 14.4, "red")], w=8,
            desc="Availability errors: INTERNAL|UNKNOWN|UNAVAILABLE over admitted requests. Shed: "
                 "RESOURCE_EXHAUSTED over all requests, per priority. Red line: the fast-burn threshold."),
        timeseries("Tokens/s", [Target(f"sum(rate(moe_serve_generation_tokens_total{{{J}}}[{RI}]))", "generated"),
                                Target(f"sum(rate(moe_serve_prompt_tokens_total{{{J}}}[{RI}]))", "prompt (prefill)"),
                                Target(f"sum by (replica) (rate(moe_serve_generation_tokens_total{{{J}}}[{RI}]))",
                                       "generated {{replica}}")],
                   unit="short", w=12),
        timeseries("Engine step duration", _quantiles("moe_serve_engine_step_seconds", "")
                   + _quantiles("moe_serve_engine_step_seconds", "replica", "replica", qs=(0.99,)), unit="s", w=12,
                   desc="p50 and p99 over all engine replicas, and each replica's p99: one replica "
                        "much slower than the others points at its node or its shards."),

        row("Tenants (serving/api/tenants.py: listed tenants by name, the rest as default / other)"),
        timeseries("Requests by tenant and status",
                   [Target(f"sum by (tenant, status) (rate(moe_serve_tenant_requests_total{{{J}}}[{RI}]))",
                           "{{tenant}} {{status}}")], unit="reqps", w=8),
        timeseries("Shed ratio by tenant", [
            Target(f'(sum by (tenant) (rate(moe_serve_tenant_requests_total{{{J},status="RESOURCE_EXHAUSTED"}}[{RI}])) '
                   f'or sum by (tenant) (rate(moe_serve_tenant_requests_total{{{J}}}[{RI}])) * 0) '
                   f'/ sum by (tenant) (rate(moe_serve_tenant_requests_total{{{J}}}[{RI}]))', "{{tenant}}")],
            unit="percentunit", w=8,
            desc="RESOURCE_EXHAUSTED over all of a tenant's requests: its own quota, or the replica's admission. "
                 "One tenant shed while the others are not is its quota at work."),
        timeseries("Tokens/s by tenant",
                   [Target(f"sum by (tenant, kind) (rate(moe_serve_tenant_tokens_total{{{J}}}[{RI}]))",
                           "{{tenant}} {{kind}}")], w=8),

        row("Latency"),
        timeseries("Time to first token by priority",
                   _quantiles("moe_serve_time_to_first_token_seconds", "priority", "priority"),
                   unit="s", steps=[(None, "green"), (float(TTFT_SLO_BUCKET_S), "red")], w=12,
                   desc=f"Red line: the TTFT SLO bucket ({TTFT_SLO_BUCKET_S} s)."),
        heatmap("Time to first token distribution",
                Target(f"sum by (le) (increase(moe_serve_time_to_first_token_seconds_bucket{{{J}}}[{RI}]))",
                       "{{le}}", fmt="heatmap"), y_unit="s", w=12),
        timeseries("Inter-token latency", _quantiles("moe_serve_inter_token_latency_seconds", ""), unit="s", w=12),
        timeseries("End-to-end latency by priority",
                   _quantiles("moe_serve_e2e_request_latency_seconds", "priority", "priority"), unit="s", w=12),

        row("Engine replicas"),
        table("Deployed model", Target(f"max by (replica, {', '.join(MODEL_INFO_LABELS)}) "
                                       f"(moe_serve_model_info{{{J}}})", "", instant=True, fmt="table"),
              w=24, h=5, desc="What each engine replica serves: checkpoint, family, serving dtype, weights on disk "
                              "(float, FP8 block-wise or per tensor, MXFP4), expert shards, transport. Two "
                              "different rows for one deployment: a redeploy is rolling out."),
        timeseries("Queue depth (waiting)", [Target(f"sum by (replica) (moe_serve_queue_depth{{{J}}})", "{{replica}}"),
                                             Target(f"sum(moe_serve_queue_depth{{{J}}})", "total")], w=8),
        timeseries("Running requests", [Target(f"sum by (replica) (moe_serve_running_requests{{{J}}})", "{{replica}}"),
                                        Target(f"sum(moe_serve_running_requests{{{J}}})", "total")], w=8),
        timeseries("KV slots used", [
            Target(f"sum by (replica) (moe_serve_kv_slots_used{{{J}}}) / sum by (replica) (moe_serve_kv_slots{{{J}}})",
                   "{{replica}}"),
            Target(f"sum(moe_serve_kv_slots_used{{{J}}}) / sum(moe_serve_kv_slots{{{J}}})", "all replicas")],
            unit="percentunit", steps=[(None, "green"), (0.9, "red")], w=8),
        timeseries("KV blocks used", [
            Target(f"sum by (replica) (moe_serve_kv_blocks_used{{{J}}}) / sum by (replica) (moe_serve_kv_blocks{{{J}}})",
                   "{{replica}}")], unit="percentunit", steps=[(None, "green"), (0.95, "red")], w=8),
        timeseries("Preemptions (KV cache full, recomputed)",
                   [Target(f"sum(rate(moe_serve_preemptions_total{{{J}}}[1m]))", "preemptions/s")], w=8),
        timeseries("Prefix cache hit rate", [
            Target(f"sum(rate(moe_serve_prefix_cache_hit_tokens_total{{{J}}}[1m])) / "
                   f"sum(rate(moe_serve_prefix_cache_query_tokens_total{{{J}}}[1m]))", "all replicas"),
            Target(f"sum by (replica) (rate(moe_serve_prefix_cache_hit_tokens_total{{{J}}}[1m])) / "
                   f"sum by (replica) (rate(moe_serve_prefix_cache_query_tokens_total{{{J}}}[1m]))", "{{replica}}")],
            unit="percentunit", w=8,
            desc="Share of the joining sequences' tokens whose K/V were cached already (not prefilled again), "
                 "in all and per engine replica: each replica has its own cache, and the router "
                 "(serving/routing/) sends a prompt where its prefix was sent before."),
        timeseries("Speculative decoding", [
            Target(f"sum(rate(moe_serve_spec_decode_accepted_tokens_total{{{J}}}[1m])) / "
                   f"sum(rate(moe_serve_spec_decode_draft_tokens_total{{{J}}}[1m]))", "draft tokens accepted"),
            Target(f"sum(rate(moe_serve_spec_decode_accepted_tokens_total{{{J}}}[1m])) / "
                   f"sum(rate(moe_serve_generation_tokens_total{{{J}}}[1m]))", "generated tokens from drafts")],
            unit="percentunit", w=8,
            desc="n-gram drafts (speculative_tokens > 0; greedy or unseeded sampled requests, few sequences "
                 "running): the share of draft tokens kept, and of all generated tokens that came as accepted "
                 "drafts (a step gained each). Empty while it is off."),
    ]
    return Dashboard("moe-serve-overview", "moe-serve / Overview & SLOs",
                     "Request rates, SLO burn, latency and engine load of a moe-serve cluster.", panels)


def experts() -> Dashboard:
    rt = "moe_serve_expert_routed_tokens_total"
    ph = "moe_serve_engine_step_phase_seconds_total"
    sel = f'{J},layer=~"$layer"'
    layer_var = _query_variable("layer", f"label_values({rt}{{{J}}}, layer)", label="MoE layer")
    panels = [
        row("Per expert"),
        heatmap("Routed tokens/s per expert, layer $layer",
                Target(f"sum by (expert) (rate({rt}{{{J},layer=~\"$layer\"}}[{RI}]))", "{{expert}}", fmt="heatmap"),
                desc="Each row is one expert of the layer; hotter = more tokens routed to it.",
                y_unit="none", repeat="layer"),
        bargauge("Expert load now (5m), layer $layer",
                 Target(f"sum by (expert) (rate({rt}{{{J},layer=~\"$layer\"}}[5m]))", "E{{expert}}", instant=True),
                 unit="short", repeat="layer"),
        row("Imbalance"),
        timeseries("Load imbalance per layer (hottest expert / mean)",
                   [Target(f"layer:moe_serve_expert_load_imbalance:ratio_rate5m{{{sel}}}", "layer {{layer}}")],
                   steps=[(None, "green"), (2, "red")], min0=False,
                   desc="1 = perfectly even. Above 2 for 15 minutes (with traffic) fires ExpertLoadImbalance."),
        timeseries("Routed tokens/s per layer",
                   [Target(f"layer:moe_serve_expert_routed_tokens:rate5m{{{sel}}}", "layer {{layer}}")]),
        table("Hottest experts (5m)",
              Target(f"topk(10, sum by (layer, expert, shard) (rate({rt}{{{sel}}}[5m])))", "", instant=True,
                     fmt="table")),
        timeseries("Per-expert token rate, all layers",
                   [Target(f"sum by (layer, expert) (rate({rt}{{{sel}}}[{RI}]))", "L{{layer}} E{{expert}}")]),
        row("Per shard"),
        timeseries("Routed tokens/s per shard",
                   [Target(f"sum by (shard) (rate({rt}{{{sel}}}[{RI}]))", "shard {{shard}}")], w=8),
        timeseries("Share of routed tokens per shard",
                   [Target(f"sum by (shard) (rate({rt}{{{sel}}}[{RI}])) "
                           f"/ ignoring (shard) group_left () sum(rate({rt}{{{sel}}}[{RI}]))", "shard {{shard}}")],
                   unit="percentunit", stack=True, w=8),
        timeseries("Shard imbalance, all selected layers (busiest shard / mean)",
                   [Target(f"max(sum by (shard) (rate({rt}{{{sel}}}[{RI}]))) "
                           f"/ avg(sum by (shard) (rate({rt}{{{sel}}}[{RI}])))", "busiest / mean")],
                   min0=False, w=8),
        timeseries("Shard imbalance per layer (5m)",
                   [Target(f"layer:moe_serve_expert_shard_load_imbalance:ratio_rate5m{{{sel}}}", "layer {{layer}}")],
                   steps=[(None, "green"), (1.25, "red")], min0=False, w=8,
                   desc="Busiest shard / mean shard, per layer. ExpertLoadImbalance needs this above 1.25 too."),
        timeseries("Shard imbalance per layer (hub, decayed)",
                   [Target(f"moe_serve_expert_shard_imbalance{{{sel}}}", "layer {{layer}}")], min0=False, w=8,
                   desc="The MetricsHub's own view: decayed recent load, updated on every engine report."),
        timeseries("Recent shard load per layer (hub, decayed tokens)",
                   [Target(f"moe_serve_expert_shard_load_tokens{{{sel}}}", "L{{layer}} shard {{shard}}")], w=8),
        timeseries("Automatic rebalancing: windows judged, by outcome",
                   [Target(f"sum by (outcome) (increase(moe_serve_expert_rebalance_decisions_total{{{J}}}[{RI}]))",
                           "{{outcome}}")], w=8,
                   desc="auto_rebalance (serving/parallel/rebalance.py): every interval the MetricsHub judges the "
                        "tokens routed since the last one; `rebalanced` published a load-aware placement. Empty "
                        "while it is off."),
        timeseries("Automatic rebalancing: predicted step imbalance",
                   [Target(f"moe_serve_expert_placement_step_imbalance{{{J}}}", "{{placement}}")], min0=False, w=8,
                   desc="Sum over layers of the busiest shard's tokens / the mean shard's, over the last judged "
                        "window: `current` is the placement in force, `after` the plan built from that window."),
        timeseries("Expert placement version",
                   [Target(f"max(moe_serve_expert_placement_version{{{J}}})", "version")], w=8,
                   desc="Bumped by every rebalance, automatic or `moe-serve placement --apply`; exported by "
                        "the MetricsHub while auto_rebalance is on."),
        row("Where the engine's step time goes"),
        timeseries("Engine step time by phase (share)",
                   [Target(f"sum by (phase) (rate({ph}{{{J}}}[{RI}])) "
                           f"/ ignoring (phase) group_left () sum(rate({ph}{{{J}}}[{RI}]))", "{{phase}}")],
                   unit="percentunit", stack=True, w=12,
                   desc="dense: attention, norms, router. experts: posting tokens to the shards, their compute "
                        "when in-process, waiting for them, the combine. head: final norm + lm_head. "
                        "sample: sampling, detokenizing, streaming hand-off. schedule: batch selection. "
                        "A large experts share with idle shards (next panel) is transport cost."),
        timeseries("Expert shard busy (fraction of time computing)",
                   [Target(f"sum by (shard) (rate(moe_serve_expert_shard_busy_seconds_total{{{J}}}[{RI}]))",
                           "shard {{shard}}")],
                   unit="percentunit", w=12,
                   desc="Seconds per second each expert shard spends in its experts' GEMMs (local and "
                        "collective transports), summed over the engine replicas that use it. Near 1: the "
                        "shards bound the step; low while the engine's experts phase is high: the time is "
                        "in the transport."),
        timeseries("Experts phase share, per engine replica",
                   [Target(f'sum by (replica) (rate({ph}{{{J},phase="experts"}}[{RI}])) '
                           f"/ sum by (replica) (rate({ph}{{{J}}}[{RI}]))", "{{replica}}")],
                   unit="percentunit", w=24,
                   desc="The share of each engine replica's step time spent on the routed experts (posting, "
                        "waiting, combining). A replica far above the others waits on slower shards or links."),
    ]
    return Dashboard("moe-serve-experts", "moe-serve / Experts",
                     "Tokens routed per expert and per expert shard; load imbalance; where the engine's "
                     "step time goes.", panels, [layer_var])


def autoscaling() -> Dashboard:
    dep = f'{J},deployment=~"$deployment"'
    engine = f'{J},deployment=~"EngineReplica.*"'
    dep_var = _query_variable("deployment", f"label_values(moe_serve_autoscaling_desired_replicas{{{J}}}, deployment)",
                              label="deployment")
    rt = "moe_serve_expert_routed_tokens_total"
    panels = [
        row("Replicas"),
        timeseries("Desired vs running replicas: $deployment", [
            Target(f"max by (deployment) (moe_serve_autoscaling_desired_replicas{{{dep}}})", "desired"),
            Target(f"max by (deployment) (moe_serve_deployment_replicas{{{dep}}})", "running")],
            step_line=True, repeat="deployment", w=8,
            desc="`desired` is what the autoscaling policy asked for; `running` is what Serve ran when it decided."),
        timeseries("Replicas short of desired",
                   [Target(f"max by (deployment) (moe_serve_autoscaling_desired_replicas{{{dep}}}) "
                           f"- max by (deployment) (moe_serve_deployment_replicas{{{dep}}})", "{{deployment}}")],
                   step_line=True, min0=False, w=12,
                   desc="Above 0 for 10 minutes fires AutoscalerReplicasBehind."),
        timeseries("Share of decisions at max_replicas (5m)",
                   [Target(f"deployment:moe_serve_autoscaling_at_max:ratio_rate5m{{{dep}}}", "{{deployment}}")],
                   unit="percentunit", steps=[(None, "green"), (0.5, "red")], w=12,
                   desc="Above 50% for 10 minutes fires AutoscalerAtMax."),
        row("Decisions"),
        timeseries("Decisions by reason", [
            Target(f"sum by (deployment, reason) (rate(moe_serve_autoscaling_decisions_total{{{dep}}}[{RI}]))",
                   "{{deployment}} {{reason}}")], unit="ops", stack=True, w=24,
            desc="reason label: see serving/autoscaling/policy.py Reason."),
        row("Load vs replicas"),
        timeseries("Engine: queue depth vs replicas", [
            Target(f"sum(moe_serve_queue_depth{{{J}}})", "waiting"),
            Target(f"sum(moe_serve_running_requests{{{J}}})", "running"),
            Target(f"sum(moe_serve_deployment_replicas{{{engine}}})", "replicas"),
            Target(f"sum(moe_serve_autoscaling_desired_replicas{{{engine}}})", "desired replicas")],
            overrides=_right_axis(".*replicas"), w=12),
        timeseries("Engine: ongoing requests per replica", [
            Target(f"(sum by (job) (moe_serve_queue_depth{{{J}}}) + sum by (job) (moe_serve_running_requests{{{J}}})) "
                   f"/ sum by (job) (moe_serve_deployment_replicas{{{engine}}})", "ongoing / replica")],
            steps=[(None, "green"), (ENGINE_TARGET_ONGOING, "red")], w=12,
            desc=f"The engine policy's signal; red line: target_ongoing_per_replica ({ENGINE_TARGET_ONGOING})."),
        timeseries("Expert shards: routed tokens/s per replica", [
            Target(f"sum by (job, shard) (rate({rt}{{{J}}}[{RI}])) / on (job, shard) group_left () "
                   f"max by (job, shard) (label_replace(moe_serve_deployment_replicas{{{J},deployment=~\"ExpertShard[0-9]+\"}}, "
                   f"\"shard\", \"$1\", \"deployment\", \"ExpertShard([0-9]+)\"))", "shard {{shard}}")],
            steps=[(None, "green"), (SHARD_TARGET_TOKENS_S, "red")], w=12,
            desc=f"The shard policy's signal; red line: target_tokens_per_s_per_replica ({SHARD_TARGET_TOKENS_S})."),
        timeseries("Expert shards: replicas", [
            Target(f'max by (deployment) (moe_serve_deployment_replicas{{{J},deployment=~"ExpertShard.*"}})',
                   "{{deployment}}")], step_line=True, w=12),
    ]
    return Dashboard("moe-serve-autoscaling", "moe-serve / Autoscaling",
                     "What the autoscaling policies decided, why, and the load they saw.", panels, [dep_var])


DASHBOARDS = {"overview.json": overview, "experts.json": experts, "autoscaling.json": autoscaling}


def render() -> dict[str, str]:
    """File name -> JSON text, exactly as committed under monitoring/grafana/."""
    return {name: json.dumps(build().to_json(), indent=2, sort_keys=False) + "\n" for name, build in DASHBOARDS.items()}


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of a rendered dashboard's panels and annotations."""
    out = [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable name, Grafana query) of a rendered dashboard's query variables (`label_values(...)`)."""
    return [(v["name"], v["query"]["query"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path, help="write the dashboards into this folder")
    g.add_argument("--check", type=Path, help="exit 1 if this folder's dashboards differ from the generator")
    a = ap.parse_args(argv)
    files = render()
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (a.out / name).write_text(text)
            print(f"wrote {a.out / name}")
        return 0
    stale = [n for n, text in files.items() if not (a.check / n).exists() or (a.check / n).read_text() != text]
    for n in stale:
        print(f"{a.check / n} is stale: run python -m serving.monitoring --out {a.check}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
