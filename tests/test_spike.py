"""The outage night, rehearsed (shortened for CI): a real 2-node cluster, real gRPC over
loopback, `moe-serve loadtest --profile spike` with interactive and batch traffic mixed.

Asserted here: no INTERNAL/UNKNOWN/UNAVAILABLE, every request ends OK or RESOURCE_EXHAUSTED
with retry pushback, every admitted request completes, batch is shed before interactive,
the engine's desired replicas rise within 5 s of the spike, replicas return to the minimum
afterwards, and the artifacts (CSV, JSON, PNG) exist. The TTFT and admit-ratio numbers are
recorded in summary.json and reported, not asserted: on a shared 2-core machine they depend
on what else runs (see the README and issue 5's note).
"""
from __future__ import annotations

import json

import pytest

from cluster_harness import moe_serve, running_cluster
from serving.model.checkpoint import write_checkpoint

pytestmark = pytest.mark.cluster


def test_spike_is_survived(tmp_path):
    ckpt = write_checkpoint("mixtral", "tiny", tmp_path / "ckpt")
    out = tmp_path / "loadtest"
    with running_cluster(ckpt, tmp_path / "state", shards=2, nodes=2) as state:
        moe_serve("loadtest", "--target", state["grpc_target"], "--metrics-url", state["metrics_url"],
                  "--profile", "spike", "--duration", "60", "--out", str(out), "--max-tokens", "24",
                  "--base-rate", "2.0", "--spike-multiplier", "10", "--batch-fraction", "0.5",
                  "--ttft-slo-s", "2", "--tail-s", "60", "--settle-s", "0", timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    for f in ("timeline.csv", "timeline.png", "summary.json"):
        assert (out / f).stat().st_size > 0, f
    assert summary["offered"] > 300
    bad = {c: n for c, n in summary["errors_by_code"].items() if c in ("INTERNAL", "UNKNOWN", "UNAVAILABLE")}
    assert not bad, summary["errors_by_code"]
    assert set(summary["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, summary["codes"]
    assert summary["shed"] > 0 and summary["shed_with_pushback"] == summary["shed"]
    assert summary["admitted_not_completed"] == 0 and summary["failed_after_first_token"] == 0
    assert summary["admitted"] == summary["completed"]
    assert summary["shed_batch"] > summary["shed_interactive"]        # batch is shed first
    assert summary["seconds_to_first_upscale_decision"] is not None
    assert summary["seconds_to_first_upscale_decision"] <= 5.0
    assert summary["max_engine_replicas"] > 1                         # new replicas came up
    assert summary["final_engine_replicas"] == 1                      # and went away again
    print(json.dumps({k: summary[k] for k in (
        "offered", "admitted", "completed", "shed", "shed_interactive", "shed_batch", "errors_by_code",
        "interactive_admit_ratio", "ttft_p99_admitted_interactive_s", "seconds_to_first_upscale_decision",
        "seconds_to_first_upscale", "max_engine_replicas", "final_engine_replicas")}))
