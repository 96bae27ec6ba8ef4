"""Prefix-affinity routing on a real cluster: `moe-serve up` with the shipped Serve config and two
engine replicas, Serve's gRPC proxy routing with serving.routing.ray_router:PrefixAffinityRouter,
grpcio over loopback, each replica's prefix-cache counters read from the metrics endpoint."""
from __future__ import annotations

import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from cluster_harness import running_cluster
from hf_reference import build_hf_checkpoint
from serving.client import MoEClient, build_request
from serving.launcher import DEFAULT_CONFIG
from serving.model.checkpoint import write_tokenizer

pytestmark = pytest.mark.cluster
VOCAB = 320
BLOCK = 16                                  # the engine's kv_block_size and the router's block_tokens


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path, _ = build_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", vocab_size=VOCAB,
                                  num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512)
    write_tokenizer(path, VOCAB)
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    engine = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "EngineReplica")
    assert engine["request_router_config"]["request_router_kwargs"]["block_tokens"] == BLOCK
    engine["autoscaling_config"].update(min_replicas=2, initial_replicas=2, max_replicas=2)
    config = tmp_path_factory.mktemp("config") / "serve_config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with running_cluster(path, tmp_path_factory.mktemp("state"), shards=1, nodes=1, config=config,
                         extra=("--transport", "local")) as state:
        yield state


def _per_replica(url: str, family: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            replica = line.split('replica="')[1].split('"')[0]
            out[replica] = out.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_each_conversation_stays_on_the_replica_that_holds_its_history(cluster):
    """10 conversations of 3 turns, a 120-token first turn (a system prompt and a question), each
    later turn's prompt the previous prompt + its answer + 20 new token ids. The first turns go out
    at once (spread by load over both replicas); every later turn must find at least its previous
    prompt's whole blocks in the prefix cache of the replica it is routed to. Routed by load alone,
    each later turn would land on the other replica half the time. (With 36-token first turns, two
    blocks of history weigh as much as one request in flight, and the router's in-flight counts,
    which lag a finished request, sent 2-3 of the 20 later turns away in 2 of ~8 CI runs.)"""
    rng = random.Random(7)
    convs = [[rng.randrange(3, VOCAB) for _ in range(120)] for _ in range(10)]
    hits, prompts = "moe_serve_prefix_cache_hit_tokens_total", "moe_serve_prompt_tokens_total"
    url = cluster["metrics_url"]
    before_hits = sum(_per_replica(url, hits).values())

    def turn(ids: list[int]) -> list[int]:
        with MoEClient(cluster["grpc_target"]) as c:
            resp = c.complete(build_request(prompt_ids=ids, max_tokens=6, temperature=0))
        return list(resp.token_ids)

    with ThreadPoolExecutor(len(convs)) as pool:
        answers = list(pool.map(turn, convs))
    expected = 0
    for _ in range(2):
        for i, ids in enumerate(convs):
            expected += len(ids) // BLOCK * BLOCK            # its previous prompt's whole blocks, at least
            ids.extend(answers[i] + [rng.randrange(3, VOCAB) for _ in range(20)])
            answers[i] = turn(ids)
    deadline = time.monotonic() + 20                          # replicas push their counters every 0.5 s
    while sum(_per_replica(url, hits).values()) - before_hits < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    got = sum(_per_replica(url, hits).values()) - before_hits
    served = _per_replica(url, prompts)
    assert len([r for r, n in served.items() if n > 0]) == 2, f"both replicas should serve: {served}"
    # at most one of the 20 later turns away (a CI run of 2b800de sent one third turn away, not
    # reproduced here; Serve passes over a replica slow to answer a queue-length probe, which the
    # router now allows for: test_prefix_routing.py); by load alone ~10 would be
    assert got >= expected - 160, f"prefix-cache hits {got} < {expected} - 160: turns went where their history was not"
