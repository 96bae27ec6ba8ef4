"""monitoring/: scrape config, rules and dashboards, checked by promtool and by a real Prometheus.

The integration test starts the real `prometheus` binary on 127.0.0.1 against a real exporter:
a prometheus_client HTTP server serving a `serving.metrics.MetricsHub` that we feed with
MetricsReports and autoscaling snapshots, as the replicas and the Serve controller do. Then every
dashboard query and every rule is evaluated through Prometheus' HTTP API.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest, start_http_server

from serving import monitoring
from serving.metrics import EngineSample, Metrics, MetricsHub, MetricsReport, RequestSample
from serving.parallel.rebalance import RebalanceDecision
from serving.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "monitoring"
RULES = MON / "rules" / "moe_serve_rules.yml"
RULES_TEST = MON / "rules" / "moe_serve_rules_test.yml"
RUNBOOK = MON / "RUNBOOK.md"
JOB = "moe-serve"
ALERTS = {"AvailabilityBudgetBurnFast", "AvailabilityBudgetBurnSlow", "TTFTBudgetBurnFast", "TTFTBudgetBurnSlow",
          "HighShedRate", "QueueBacklogGrowing", "AutoscalerAtMax", "AutoscalerReplicasBehind",
          "ExpertLoadImbalance", "MetricsDown"}


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} not found: `make test` installs Debian's prometheus package (promtool, prometheus)")
    return path


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _dashboards() -> dict[str, dict]:
    return {name: json.loads((MON / "grafana" / name).read_text()) for name in monitoring.DASHBOARDS}


# ---------------------------------------------------------------- metric names
def exported_names() -> set[str]:
    """Every sample name a real `Metrics()` registry can expose, from its exposition's TYPE lines."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
    text = generate_latest(Metrics().registry).decode()
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "counter":               # the text format names a counter family with its _total
            family = family.removesuffix("_total")
        names |= {family + s for s in suffixes[kind]}
    return names


def promql_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)          # string literals (label values, regexes)
    e = re.sub(r"\{[^}]*\}", "", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                        # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
    return {m.group(0) for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()", e)
            if m.group(0) not in keywords}


def test_promql_names_parser():
    assert promql_names('sum by (job, le) (rate(a_total{x="b(c)",y=~"d|e"}[5m])) / on (job) group_left () b:c:d') \
        == {"a_total", "b:c:d"}
    assert promql_names('histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval]))) or vector(0)') \
        == {"h_bucket"}


def test_every_expression_uses_only_defined_metrics():
    exported = exported_names()
    # the derivation matches what a fed hub actually exposes
    hub = _fed_hub()
    sample_names = set(re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{| )", generate_latest(hub.metrics.registry).decode(), re.M))
    assert sample_names <= exported and len(sample_names) >= 20, sample_names - exported
    recorded = {r["record"] for r in _rules() if "record" in r}
    known = exported | recorded | {"up", "ALERTS"}
    exprs = [(r.get("record") or r["alert"], r["expr"]) for r in _rules()]
    for name, dash in _dashboards().items():
        exprs += [(f"{name}: {title}", q) for title, q in monitoring.panel_queries(dash)]
        exprs += [(f"{name}: ${var}", _label_values_to_promql(q)) for var, q in monitoring.variable_queries(dash)]
    bad = {(where, n) for where, q in exprs for n in promql_names(q) if n not in known}
    assert not bad, f"unknown metric names (not in serving/metrics.py nor the recording rules): {sorted(bad)}"
    used = {n for _, q in exprs for n in promql_names(q)}
    assert {"moe_serve_requests_total", "moe_serve_time_to_first_token_seconds_bucket",
            "moe_serve_expert_routed_tokens_total", "moe_serve_autoscaling_desired_replicas"} <= used


# ---------------------------------------------------------------- static checks
def test_promtool_check_config_and_rules():
    promtool = _tool("promtool")
    for args in (["check", "config", str(MON / "prometheus.yml")], ["check", "rules", str(RULES)],
                 ["test", "rules", str(RULES_TEST)]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"


def test_scrape_config():
    cfg = yaml.safe_load((MON / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == JOB)
    assert job["scrape_interval"] == "5s"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    assert all((MON / f).exists() for f in cfg["rule_files"])


def test_alerts_are_complete_and_have_runbooks():
    anchors = {_anchor(h) for h in re.findall(r"^#{1,3} (.+)$", RUNBOOK.read_text(), re.M)}
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    assert set(alerts) == ALERTS
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert tested == ALERTS, f"alerts without promtool tests: {ALERTS - tested}"
    test_text = RULES_TEST.read_text()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], name
        path, _, anchor = ann["runbook_url"].partition("#")
        assert path == "monitoring/RUNBOOK.md" and anchor in anchors, (name, ann["runbook_url"])
        # each alert is tested both firing and not firing
        assert re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", test_text), f"{name}: no not-firing test"
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n", test_text), f"{name}: no firing test"


def _anchor(heading: str) -> str:
    """GitHub's heading anchor."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", heading.strip().lower()))


def test_dashboards_match_the_generator():
    files = monitoring.render()
    assert set(files) == {"overview.json", "experts.json", "autoscaling.json"}
    for name, text in files.items():
        committed = (MON / "grafana" / name).read_text()
        assert committed == text, f"monitoring/grafana/{name} is stale: python -m serving.monitoring --out monitoring/grafana"
        d = json.loads(text)
        assert d["schemaVersion"] == monitoring.SCHEMA_VERSION and d["uid"].startswith("moe-serve-")
        assert any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" for v in d["templating"]["list"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for p in d["panels"]:
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, (name, p["title"])
                assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"])
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"])


# ---------------------------------------------------------------- a real Prometheus against a real MetricsHub
LAYERS, EXPERTS, SHARDS = 4, 8, 2


def _report(rng: random.Random, replica: str) -> MetricsReport:
    reqs = []
    for _ in range(rng.randint(6, 12)):
        prio = "interactive" if rng.random() < 0.7 else "batch"
        u = rng.random()
        status = ("OK" if u < 0.85 else "RESOURCE_EXHAUSTED" if u < 0.93 else "INVALID_ARGUMENT" if u < 0.96
                  else "INTERNAL" if u < 0.98 else "UNAVAILABLE")
        if status == "OK":
            ttft = rng.lognormvariate(-1.5, 1.0)
            itl = [rng.uniform(0.005, 0.05) for _ in range(rng.randint(2, 8))]
            reqs.append(RequestSample(status, prio, ttft_s=ttft, itl_s=itl, e2e_s=ttft + sum(itl),
                                      tenant=("chat", "default", "other")[len(reqs) % 3],
                                      prompt_tokens=8, completion_tokens=len(itl) + 1))
        else:
            reqs.append(RequestSample(status, prio, tenant=("chat", "default")[len(reqs) % 2]))
    routed = {}
    for layer in range(LAYERS):
        for e in range(EXPERTS):    # expert 0 is hot; contiguous placement: experts 0-3 on shard 0
            routed[(layer, e, e * SHARDS // EXPERTS)] = rng.randint(40, 60) * (4 if e == 0 else 1)
    engine = EngineSample(num_waiting=rng.randint(0, 12), num_running=rng.randint(1, 16), kv_slots_used=rng.randint(1, 16),
                          kv_slots_total=16, kv_blocks_used=rng.randint(8, 60), kv_blocks_total=64,
                          preemptions=rng.randint(0, 2),
                          prompt_tokens=rng.randint(100, 400), generated_tokens=rng.randint(50, 200),
                          prefix_query_tokens=rng.randint(300, 400), prefix_hit_tokens=rng.randint(0, 300),
                          spec_draft_tokens=rng.randint(40, 80), spec_accepted_tokens=rng.randint(10, 40),
                          step_seconds=[rng.uniform(0.01, 0.08) for _ in range(5)], routed_tokens=routed,
                          phase_seconds={"schedule": 0.001, "dense": 0.04, "experts": 0.1, "head": 0.05,
                                         "sample": 0.009},
                          shard_busy_seconds={s: 0.05 + 0.02 * s for s in range(SHARDS)},
                          model={"model": "demo-deepseek", "family": "deepseek_v3", "dtype": "bf16",
                                 "weights": "fp8-block128x128", "expert_shards": str(SHARDS), "transport": "collective"})
    return MetricsReport(reporter=replica, requests=reqs, engine=engine)


def _fed_hub() -> MetricsHub:
    hub = MetricsHub()
    rng = random.Random(0)
    for i in range(3):
        for r in ("engine-0", "engine-1"):
            hub.apply(_report(rng, r))
        _apply_decisions(hub, i)
    return hub


def _apply_decisions(hub: MetricsHub, tick: int) -> None:
    """Snapshots as serving.metrics.record_autoscaling_decision publishes them."""
    hub.apply_autoscaling({"deployment": "EngineReplica", "desired": 3, "current": 3 if tick > 1 else 2,
                           "reason": "at_max", "counts": {"queue_backlog": 4 + tick, "at_max": 10 * tick}})
    for s in range(SHARDS):
        hub.apply_autoscaling({"deployment": f"ExpertShard{s}", "desired": 2 if s == 0 else 1, "current": 1,
                               "reason": "token_load" if s == 0 else "steady",
                               "counts": {"token_load" if s == 0 else "steady": 5 * tick + 1}})
    # automatic expert rebalancing's window judgements (the MetricsHub's own, serving/parallel/rebalance.py)
    rebalanced = tick % 4 == 0
    hub.apply_rebalance(RebalanceDecision(None, 1.4 if rebalanced else 1.04, 1.02 if rebalanced else 1.04,
                                          6000.0, "rebalanced" if rebalanced else "balanced"), tick // 4 + 1)


def test_hub_drops_every_series_of_a_replica_that_stopped_reporting(monkeypatch):
    import serving.metrics as metrics_mod
    now = [1000.0]
    monkeypatch.setattr(metrics_mod.time, "monotonic", lambda: now[0])
    hub, rng = MetricsHub(), random.Random(3)
    for r in ("engine-0", "engine-1"):
        hub.apply(_report(rng, r))

    def replicas() -> dict[str, set[str]]:
        """metric family -> replicas it has series for, from the exposition."""
        seen: dict[str, set[str]] = {}
        for line in generate_latest(hub.metrics.registry).decode().splitlines():
            m = re.match(r'(\w+)\{.*replica="([^"]+)"', line)
            if m:
                seen.setdefault(m.group(1), set()).add(m.group(2))
        return seen

    before = replicas()
    per_replica = {"moe_serve_queue_depth", "moe_serve_running_requests", "moe_serve_kv_slots_used",
                   "moe_serve_kv_slots", "moe_serve_kv_blocks_used", "moe_serve_kv_blocks",
                   "moe_serve_preemptions_total", "moe_serve_prompt_tokens_total",
                   "moe_serve_generation_tokens_total", "moe_serve_prefix_cache_query_tokens_total",
                   "moe_serve_prefix_cache_hit_tokens_total", "moe_serve_engine_step_seconds_count",
                   "moe_serve_engine_step_phase_seconds_total", "moe_serve_expert_shard_busy_seconds_total",
                   "moe_serve_model_info", "moe_serve_spec_decode_draft_tokens_total",
                   "moe_serve_spec_decode_accepted_tokens_total"}
    assert per_replica <= set(before) and all(before[f] == {"engine-0", "engine-1"} for f in per_replica)
    now[0] += metrics_mod.STALE_REPORTER_S / 2
    hub.apply(_report(rng, "engine-1"))
    assert replicas() == before                      # not silent long enough yet
    now[0] += metrics_mod.STALE_REPORTER_S / 2 + 1
    hub.apply(_report(rng, "engine-1"))              # engine-0: silent for longer than STALE_REPORTER_S
    after = replicas()
    assert set(after) == set(before) and all(v == {"engine-1"} for v in after.values()), after
    # what is not per replica stays: the routed-token and request counters
    text = generate_latest(hub.metrics.registry).decode()
    assert "moe_serve_expert_routed_tokens_total{" in text and "moe_serve_requests_total{" in text
    hub.apply(_report(rng, "engine-0"))              # a replica that comes back starts its series again
    assert replicas()["moe_serve_engine_step_phase_seconds_total"] == {"engine-0", "engine-1"}


class _Feeder(threading.Thread):
    """Keeps applying reports (like replicas do every report_interval_s) while Prometheus scrapes."""

    def __init__(self, hub: MetricsHub, period_s: float = 0.25, max_ticks: int = 1200):
        super().__init__(daemon=True)
        self.hub, self.period_s, self.max_ticks = hub, period_s, max_ticks
        self.stop = threading.Event()

    def run(self):
        rng = random.Random(1)
        for tick in range(self.max_ticks):          # bounded: ~5 minutes at most
            for r in ("engine-0", "engine-1"):
                self.hub.apply(_report(rng, r))
            _apply_decisions(self.hub, tick)
            if self.stop.wait(self.period_s):
                return


def _api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:      # 400/422 carry the PromQL error as JSON
        body = e.read()
        try:
            return json.loads(body)
        except ValueError:                    # 503 while it starts up: plain text
            return {"status": "error", "error": f"HTTP {e.code}: {body[:200]!r}"}


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    """(Prometheus base URL, hub): real prometheus scraping a real MetricsHub every 1 s."""
    prometheus = _tool("prometheus")
    hub = MetricsHub()
    server, _ = start_http_server(0, addr="127.0.0.1", registry=hub.metrics.registry)
    feeder = _Feeder(hub)
    feeder.start()
    tmp = tmp_path_factory.mktemp("prom")
    port = free_port()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "scrape_interval": "1s", "scrape_timeout": "1s",
                            "static_configs": [{"targets": [f"127.0.0.1:{server.server_port}"]}]}]}))
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    records = [r["record"] for r in _rules() if "record" in r]
    try:
        deadline, waiting_for = time.monotonic() + 40, ["the first scrape"]
        for _ in range(200):      # bounded in count and time: until the target is up and every rule has run
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited {proc.returncode}:\n{(tmp / 'prometheus.log').read_text()[-3000:]}")
            try:
                if _has_value(base, f'up{{job="{JOB}"}} == 1'):
                    waiting_for = [r for r in records if not _has_value(base, r)]
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if not waiting_for:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"after 40 s, still no data for {waiting_for}:\n"
                            f"{(tmp / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.5)
        time.sleep(2)             # a few more scrapes and rule evaluations on top
        yield base, hub
    finally:
        feeder.stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        server.shutdown()
        feeder.join(timeout=5)


def _has_value(base: str, query: str) -> bool:
    r = _api(base, "/api/v1/query", query=query)
    return r.get("status") == "success" and any(_finite(s) for s in r["data"]["result"])


def _finite(sample: dict) -> bool:
    v = float(sample["value"][1])
    return v == v and v not in (float("inf"), float("-inf"))


def _substitute(expr: str) -> str:
    """Grafana's template variables, as 'All' selections would expand them."""
    out = (expr.replace("$__rate_interval", "15s").replace('"$job"', '".*"').replace('"$layer"', '".*"')
           .replace('"$deployment"', '".*"'))
    assert not re.search(r"\$(?!1\b)[A-Za-z_{]", out), f"unsubstituted template variable in {expr}"
    return out


def _label_values_to_promql(q: str) -> str:
    m = re.fullmatch(r"label_values\((.+), (\w+)\)", q)
    assert m, q
    return f"count by ({m.group(2)}) ({m.group(1)})"


def test_every_dashboard_query_runs_on_real_prometheus(prom):
    base, _ = prom
    failures, empty = [], []
    for name, dash in _dashboards().items():
        queries = [(t, q) for t, q in monitoring.panel_queries(dash) if not t.startswith("annotation")]
        queries += [(f"${v}", _label_values_to_promql(q)) for v, q in monitoring.variable_queries(dash)]
        assert len(queries) >= 8, name
        for title, q in queries:
            r = _api(base, "/api/v1/query", query=_substitute(q))
            if r.get("status") != "success":
                failures.append((name, title, q, r.get("error")))
            elif not r["data"]["result"]:
                empty.append((name, title, q))
    assert not failures, failures
    # every panel shows data when the cluster reports every kind of metric
    assert not empty, empty
    # the annotation query is valid PromQL too (no alert is firing here, so it is empty)
    ann = _api(base, "/api/v1/query", query=_substitute(monitoring.panel_queries(_dashboards()["overview.json"])[0][1]))
    assert ann["status"] == "success"


def test_every_rule_runs_on_real_prometheus(prom):
    base, _ = prom
    groups = _api(base, "/api/v1/rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    rules = _rules()
    assert set(loaded) == {r.get("record") or r["alert"] for r in rules}
    bad = [(n, r.get("lastError")) for n, r in loaded.items() if r["health"] != "ok"]
    assert not bad, bad
    missing = []
    for r in rules:
        direct = _api(base, "/api/v1/query", query=r["expr"])
        assert direct["status"] == "success", (r.get("record") or r["alert"], direct.get("error"))
        if "record" in r and not _api(base, "/api/v1/query", query=r["record"])["data"]["result"]:
            missing.append(r["record"])
    assert not missing, f"recording rules with no output: {missing}"


def test_key_series_have_sane_values(prom):
    base, _ = prom

    def values(q: str) -> dict[str, float]:
        r = _api(base, "/api/v1/query", query=q)
        assert r["status"] == "success", r
        return {json.dumps(s["metric"], sort_keys=True): float(s["value"][1]) for s in r["data"]["result"]}

    assert sum(values("job:moe_serve_requests:rate5m").values()) > 0
    statuses = {json.loads(k)["status"] for k in values("status_priority:moe_serve_requests:rate5m")}
    assert {"OK", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE"} <= statuses
    p99 = values('priority:moe_serve_time_to_first_token_seconds:p99_rate5m{priority="interactive"}')
    assert p99 and all(0 < v <= 60 for v in p99.values()), p99
    info = values("moe_serve_model_info")                 # one series a replica, labelled with what it serves
    assert len(info) == 2 and set(info.values()) == {1.0}
    assert {json.loads(k)["weights"] for k in info} == {"fp8-block128x128"}
    shed = values("job:moe_serve_requests_shed:ratio_rate5m")
    assert shed and all(0 < v < 0.5 for v in shed.values()), shed
    err = values("job:moe_serve_availability_errors:ratio_rate5m")
    assert err and all(0 < v < 0.2 for v in err.values()), err
    # expert 0 gets 4x the others: max / mean = 4 / (11 / 8) ~ 2.9 in every layer
    imb = values("layer:moe_serve_expert_load_imbalance:ratio_rate5m")
    assert len(imb) == LAYERS and all(2.0 < v < 4.0 for v in imb.values()), imb
    # the step-phase shares of the experts dashboard add up to 1; experts is half of every report's step
    ph = "moe_serve_engine_step_phase_seconds_total"
    share = {json.loads(k)["phase"]: v for k, v in values(
        f"sum by (phase) (rate({ph}[15s])) / ignoring (phase) group_left () sum(rate({ph}[15s]))").items()}
    assert set(share) == {"schedule", "dense", "experts", "head", "sample"}
    assert sum(share.values()) == pytest.approx(1.0) and share["experts"] == pytest.approx(0.5, abs=0.01)
    # ... and per engine replica (each reports the same phase split)
    per_replica = {json.loads(k)["replica"]: v for k, v in values(
        f'sum by (replica) (rate({ph}{{phase="experts"}}[15s])) / sum by (replica) (rate({ph}[15s]))').items()}
    assert set(per_replica) == {"engine-0", "engine-1"}
    assert all(v == pytest.approx(0.5, abs=0.01) for v in per_replica.values()), per_replica
    desired = values("moe_serve_autoscaling_desired_replicas")
    assert {json.loads(k)["deployment"]: v for k, v in desired.items()} == {
        "EngineReplica": 3, "ExpertShard0": 2, "ExpertShard1": 1}
    at_max = values("deployment:moe_serve_autoscaling_at_max:ratio_rate5m")
    assert {json.loads(k)["deployment"]: v > 0.5 for k, v in at_max.items()} == {
        "EngineReplica": True, "ExpertShard0": False, "ExpertShard1": False}
    # the same live data puts these alerts in pending (their `for:` is minutes): Prometheus
    # evaluates them on recorded series, so give the alert groups a few evaluations
    expected = {("AutoscalerReplicasBehind", "ExpertShard0"), ("AutoscalerAtMax", "EngineReplica"),
                ("HighShedRate", None), ("AvailabilityBudgetBurnFast", None)}
    deadline = time.monotonic() + 10
    for _ in range(40):
        alerts = _api(base, "/api/v1/alerts")["data"]["alerts"]
        pending = {(a["labels"]["alertname"], a["labels"].get("deployment")) for a in alerts}
        if expected <= pending or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert expected <= pending, expected - pending
    assert not any(a["labels"]["alertname"] == "MetricsDown" for a in alerts)
