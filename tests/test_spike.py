"""The outage night, rehearsed (shortened for CI): a real 2-node cluster, real gRPC over
loopback, `moe-serve loadtest --profile spike` with interactive and batch traffic mixed.

The checkpoint has a hot expert (expert 0, on shard 0), so the expert shards see uneven load,
as they do with real models. The loadtest first measures the cluster's sustainable rate: 12
closed-loop streams, the engine autoscaler's target load for one replica, read from the token
throughput. The baseline is 0.25 x that rate, and the spike 10x the baseline: 2.5x what one
engine replica sustains, 70% of it batch, so interactive traffic alone is 0.75x what one replica
serves at its target load. On 2 shared cores a second engine replica adds no capacity (one
already keeps the cores busy; in a clean rehearsal with 2 replicas the spike ran at 35-120 tok/s
against 80-100 with one), so the interactive part must fit in one replica: with interactive at
1.0x, 16% of it was shed (0.84 admitted, predicted waits of 2.0-4.4 s).

Asserted here, the checks of issue 5: no INTERNAL/UNKNOWN/UNAVAILABLE; every request ends OK,
or RESOURCE_EXHAUSTED with retry pushback; every admitted request completes; batch is shed
first and >= 90% of interactive requests are admitted during the spike; their p99 TTFT is
within 2x the SLO; the engine's desired replicas rise within 5 s of the spike; the shard that
takes the most tokens decides to scale first; replicas return to the minimum afterwards; the
artifacts (CSV, JSON, PNG) exist, and a new engine replica serves within 15 s of the spike.
The capacity thresholds (the spike overloading the engine at all, interactive admitted, their
TTFT, the desired replicas rising within 5 s, the new replica's start) must each be met in one of
up to three rehearsals (they are marginal on 2 shared cores); everything else, that scaling was
decided at all included, must hold in every one.
"""
from __future__ import annotations

import json

import pytest

from cluster_harness import moe_serve, running_cluster
from serving.model.checkpoint import write_checkpoint

pytestmark = pytest.mark.cluster

TTFT_SLO_S = 2.0


# Thresholds that measure how much capacity the two cores had left during the spike. On this 2-core
# machine they are marginal (README, known limits): the machine's speed drifts 2-3x within an hour
# (tokens/s with 16 running read 60-300 in the spike on 2026-12-03). They get up to two more
# rehearsals, each on a fresh cluster; the correctness checks in `_rehearse` (no error codes,
# pushback on every shed, nothing admitted lost, batch shed first, the scaling decisions) must hold
# in every rehearsal, the first included. Whether the spike overloaded the engine at all is a
# premise of the same kind (it is sized from a measurement on the same cores).
CAPACITY_CHECKS = {
    # the rehearsal's premise: the spike is a multiple of the rate measured first, so when that
    # measurement ran slow the spike was no overload and nothing was shed
    "the spike overloaded the engine (something was shed)": lambda s: s["shed"] > 0,
    "interactive admitted >= 0.9": lambda s: s["interactive_admit_ratio"] >= 0.9,
    "admitted interactive TTFT p99 <= 2x SLO": lambda s: s["ttft_p99_admitted_interactive_s"] <= 2 * TTFT_SLO_S,
    "a new engine replica serves within 15 s": lambda s: (s["seconds_to_first_upscale"] is not None
                                                          and s["seconds_to_first_upscale"] <= 15.0),
    # how fast the backlog builds depends on how fast the cores run the engine that moment: in a CI
    # run of 28d5794 the spike shed 6 of 280 (a mild overload) and the decision came at 6.1 s
    # (none at all: the spike did not overload the engine in that rehearsal, on a fast phase of the cores)
    "the engine's desired replicas rise within 5 s": lambda s: (s["seconds_to_first_upscale_decision"] is not None
                                                                and s["seconds_to_first_upscale_decision"] <= 5.0),
}
REHEARSALS = 3


def _rehearse(ckpt, work) -> dict:
    out = work / "loadtest"
    with running_cluster(ckpt, work / "state", shards=2, nodes=2) as state:
        moe_serve("loadtest", "--target", state["grpc_target"], "--metrics-url", state["metrics_url"],
                  "--profile", "spike", "--duration", "60", "--out", str(out), "--max-tokens", "24",
                  "--baseline-load", "0.25", "--measure-concurrency", "12", "--measure-s", "8",
                  "--spike-multiplier", "10", "--batch-fraction", "0.7", "--ttft-slo-s", str(TTFT_SLO_S),
                  "--tail-s", "60", "--settle-s", "30", timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    print(json.dumps({k: summary[k] for k in (
        "measured_rate", "base_rate", "offered", "admitted", "completed", "shed", "shed_interactive",
        "shed_batch", "errors_by_code", "interactive_admit_ratio", "ttft_p99_admitted_interactive_s",
        "seconds_to_first_upscale_decision", "seconds_to_first_upscale", "max_engine_replicas",
        "final_engine_replicas", "routed_tokens_by_shard", "first_upscale_decision_s_by_deployment")}))
    for f in ("timeline.csv", "timeline.png", "summary.json"):
        assert (out / f).stat().st_size > 0, f
    assert summary["offered"] > 100
    bad = {c: n for c, n in summary["errors_by_code"].items() if c in ("INTERNAL", "UNKNOWN", "UNAVAILABLE")}
    assert not bad, summary["errors_by_code"]
    assert set(summary["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, summary["codes"]
    assert summary["shed_with_pushback"] == summary["shed"]
    assert summary["admitted_not_completed"] == 0 and summary["failed_after_first_token"] == 0
    assert summary["admitted"] == summary["completed"]
    if summary["shed"]:
        assert summary["shed_batch"] > summary["shed_interactive"]    # batch is shed first
    # whether the engine scaled up (a decision within 5 s, a new replica serving within 15 s) is a
    # capacity check (CAPACITY_CHECKS): one rehearsal of three must meet it
    assert summary["hottest_shard_deployment"] == "ExpertShard0"      # the hot expert's shard
    first = summary["first_upscale_decision_s_by_deployment"]
    assert first["ExpertShard0"] is not None
    assert first["ExpertShard1"] is None or first["ExpertShard0"] < first["ExpertShard1"]   # hot shard first
    assert summary["final_engine_replicas"] == 1                      # and went away again
    assert all(n == 1 for n in summary["final_replicas_by_deployment"].values()), \
        summary["final_replicas_by_deployment"]                        # shards too
    return summary


def test_spike_is_survived(tmp_path):
    ckpt = write_checkpoint("mixtral", "tiny", tmp_path / "ckpt", hot_experts=(0,), hot_gain=3.0)
    # each capacity threshold must be met in at least one rehearsal (the correctness checks in all):
    # on a fast phase of these cores the spike may not overload the engine in one rehearsal, on a
    # slow one the decision may come late in another (CI of 9965bb3: 0, 2 and 0 shed, decisions at
    # 1.2, 5.4 and 0.7 s)
    never_met = set(CAPACITY_CHECKS)
    for attempt in range(1, REHEARSALS + 1):
        summary = _rehearse(ckpt, tmp_path / f"rehearsal-{attempt}")
        missed = [name for name, ok in CAPACITY_CHECKS.items() if not ok(summary)]
        never_met &= set(missed)
        if not never_met:
            break
        print(f"rehearsal {attempt} of {REHEARSALS} missed: {missed}; not met yet: {sorted(never_met)}")
    assert not never_met, f"capacity thresholds met in no rehearsal: {sorted(never_met)}"
