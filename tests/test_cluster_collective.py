"""`moe-serve up --transport collective` on a real 2-node cluster, as the peer benchmark runs it:
gRPC -> Serve's proxy -> the engine replica, whose engine core process computes expert shard 0
itself (`engine_expert_shard`, the shipped config) while shard 1 is an actor on the other node,
joined over gloo. Greedy tokens must equal transformers', concurrent requests included; each
shard holds only its own experts; both report their compute time to Prometheus."""
from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cluster_harness import ray_query, running_cluster
from serving.client import MoEClient, build_request
from test_cluster_e2e import ckpt  # noqa: F401  (the e2e checkpoint fixture: written by transformers, 320 ids)

pytestmark = pytest.mark.cluster
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(ckpt, tmp_path_factory):
    with running_cluster(ckpt[0], tmp_path_factory.mktemp("state"), shards=2, nodes=2,
                         extra=("--transport", "collective")) as state:
        yield state


def _hf_greedy(hf, ids: list[int]) -> list[int]:
    return hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()


def test_greedy_tokens_equal_transformers_alone_and_batched(cluster, ckpt):
    prompts = [[5, 17, 99, 250, 3, 42, 7], [11] * 23, [300, 2, 64], list(range(3, 40))]
    expected = [_hf_greedy(ckpt[1], p) for p in prompts]

    def generate(ids: list[int]) -> list[int]:
        with MoEClient(cluster["grpc_target"]) as c:
            return list(c.complete(build_request(prompt_ids=ids, max_tokens=NEW_TOKENS, temperature=0,
                                                 ignore_eos=True)).token_ids)

    assert generate(prompts[0]) == expected[0]
    with ThreadPoolExecutor(len(prompts)) as pool:          # one continuous batch, both shards busy
        assert list(pool.map(generate, prompts)) == expected


def test_shard_zero_runs_in_the_engine_process_and_shard_one_on_the_other_node(cluster):
    info = ray_query(cluster, """
from serving.deployments.config import node_resource
engine = serve.get_deployment_handle("EngineReplica", app_name="moe")
print(json.dumps({"shards": engine.describe_shards.remote().result(), "ready": engine.ready.remote().result(),
                  "deployments": sorted(serve.status().applications["moe"].deployments),
                  "pinned": {i: [n["NodeID"] for n in ray.nodes() if n["Alive"] and node_resource(i) in n["Resources"]]
                             for i in range(2)}}))
""")
    assert info["deployments"] == ["EngineReplica", "MetricsHubDeployment"]   # no ExpertShard deployments
    assert info["ready"]["transport"] == "collective" and info["ready"]["engine_process"] is True
    s0, s1 = info["shards"]
    assert (s0["shard_id"], s0["in_engine"], s1["shard_id"], s1["in_engine"]) == (0, True, 1, False)
    # the engine replica is pinned to node 0 (serving/deployments/app.py), shard s to node s
    assert [s0["node_id"]] == info["pinned"]["0"] and [s1["node_id"]] == info["pinned"]["1"]
    assert s0["node_id"] != s1["node_id"]
    assert s0["pid"] == info["ready"]["engine_core_pid"] != s1["pid"]     # shard 0: the engine core's process
    # each holds only its own experts: per layer, disjoint, and together all 5
    for layer, mine in s0["experts"].items():
        assert set(mine).isdisjoint(s1["experts"][layer]) and sorted(mine + s1["experts"][layer]) == list(range(5))
    assert s0["num_parameters"] > 0 and s1["num_parameters"] > 0


def test_both_shards_report_compute_time(cluster):
    with MoEClient(cluster["grpc_target"]) as c:
        c.complete(build_request(prompt_ids=list(range(3, 60)), max_tokens=8, temperature=0, ignore_eos=True))
    deadline, busy = time.monotonic() + 20, {}
    while time.monotonic() < deadline:       # the engine pushes its metrics every 0.5 s
        with urllib.request.urlopen(cluster["metrics_url"], timeout=10) as r:
            text = r.read().decode()
        busy = {line.split('shard="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("moe_serve_expert_shard_busy_seconds_total{")}
        if set(busy) == {"0", "1"} and all(v > 0 for v in busy.values()):
            break
        time.sleep(0.5)
    assert set(busy) == {"0", "1"} and all(v > 0 for v in busy.values()), busy


def test_n_completions_equal_single_requests_with_seeds_and_reuse_the_prompt(cluster):
    """n = 3 sampled completions through the real engine: completion i equals a request of its
    own with seed + i, and completions 1, 2 found the prompt's full KV blocks in the prefix cache
    (completion 0 prefilled them)."""
    prompt = list(range(100, 140))                # 40 tokens: 2 full blocks of 16
    kw = dict(prompt_ids=prompt, max_tokens=6, temperature=1.0, ignore_eos=True)
    with MoEClient(cluster["grpc_target"]) as c:
        got = c.complete(build_request(**kw, seed=7, n=3))
        singles = [list(c.complete(build_request(**kw, seed=7 + i)).token_ids) for i in range(3)]
    assert [list(x.token_ids) for x in got.completions] == singles
    assert len({tuple(s) for s in singles}) > 1          # sampled: the seeds made them differ
    assert [x.usage.cached_prompt_tokens >= 32 for x in got.completions[1:]] == [True, True]
    assert got.usage.completion_tokens == 18
