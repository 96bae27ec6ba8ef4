"""Automatic expert rebalancing on a real 2-node cluster (collective transport): a checkpoint whose
router favours experts held by one shard is served under traffic; the MetricsHub judges the routed
load, publishes a load-aware placement, the engine and its shards switch to it, and greedy
completions keep their tokens. Loopback only; `down` stops every process (the harness checks)."""
from __future__ import annotations

import re
import time
import urllib.request

import pytest
import yaml

from cluster_harness import engine_after_placement, running_cluster
from serving.client import MoEClient, build_request
from serving.launcher import DEFAULT_CONFIG
from serving.model.checkpoint import write_checkpoint

pytestmark = pytest.mark.cluster
HOT = (2, 3)               # shard 1's experts under the deployed contiguous placement of the 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ckpt = write_checkpoint("mixtral", "tiny", tmp_path_factory.mktemp("ckpt") / "hot", hot_experts=HOT, hot_gain=6.0)
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    args = cfg["applications"][0]["args"]
    args.update(transport="collective", ping_pong=False,
                auto_rebalance={"interval_s": 2, "min_window_tokens": 64, "trigger_imbalance": 1.05, "min_gain": 0.2})
    config = tmp_path_factory.mktemp("config") / "serve_config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with running_cluster(ckpt, tmp_path_factory.mktemp("state"), shards=2, nodes=2, config=config) as state:
        yield state


def _metric(url: str, pattern: str) -> float | None:
    with urllib.request.urlopen(url, timeout=10) as r:
        m = re.search(pattern, r.read().decode(), re.M)
    return float(m.group(1)) if m else None


def test_a_skewed_load_is_rebalanced_without_changing_tokens(cluster):
    url = cluster["metrics_url"]
    assert _metric(url, r"^moe_serve_expert_placement_version (\S+)") in (None, 0.0)
    req = build_request(prompt_ids=[11, 22, 33, 44, 55], max_tokens=24, temperature=0, ignore_eos=True)
    with MoEClient(cluster["grpc_target"]) as c:
        baseline = list(c.complete(req).token_ids)
        deadline, version = time.monotonic() + 120, None
        for i in range(400):                           # traffic until the hub rebalances (bounded)
            c.complete(build_request(prompt_ids=[7 + i % 50, 3, 9 + i % 7, 12], max_tokens=16, ignore_eos=True))
            version = _metric(url, r"^moe_serve_expert_placement_version (\S+)")
            if (version or 0) >= 1 or time.monotonic() > deadline:
                break
        assert version is not None and version >= 1, "no automatic rebalance within the bound"
        rebalanced = _metric(url, r'^moe_serve_expert_rebalance_decisions_total\{outcome="rebalanced"\} (\S+)')
        before = _metric(url, r'^moe_serve_expert_placement_step_imbalance\{placement="current"\} (\S+)')
        after = _metric(url, r'^moe_serve_expert_placement_step_imbalance\{placement="after"\} (\S+)')
        assert rebalanced >= 1 and before > 1.05 and after < before, (rebalanced, before, after)
        assert engine_after_placement(cluster, 1)["placement_version"] >= 1   # the engine routes by the new plan
        assert list(c.complete(req).token_ids) == baseline             # the same math on the new copies
