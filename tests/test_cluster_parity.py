"""Greedy parity through the whole cluster, for every family at S = 1, 2 and 4 expert shards
(and DeepSeek-V3's block-wise FP8 checkpoint format at S = 2):
`moe-serve generate --json --temperature 0` returns transformers' greedy tokens for 32 new tokens,
alone and with concurrent requests of different lengths in one continuous batch.

One 2-node cluster serves all 22 cases: the first case starts it with `moe-serve up`, every later
one swaps checkpoint and shard count with `moe-serve redeploy` (Ray, Serve and the gRPC proxy stay
up), as an operator would. The Serve config is cluster/serve_config.yaml with one replica per
deployment (no autoscaling: one engine replica, so concurrent requests share one batch). The module
stops the cluster with `moe-serve down` and checks that no process it started is left.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from cluster_harness import moe_serve, ray_query, running_cluster
from hf_reference import build_hf_checkpoint, quantize_hf_checkpoint
from serving.client import MoEClient, build_request
from serving.launcher import DEFAULT_CONFIG, read_state
from serving.model.checkpoint import write_tokenizer
from serving.model.config import MoEConfig
from serving.model.quantization import FP8BlockQuant

pytestmark = pytest.mark.cluster
VOCAB = 300
NEW_TOKENS = 32
SHARDS = (1, 2, 4)
PROMPT_LENGTHS = (6, 29, 2, 14)

# Shapes vary on purpose (the rest: tests/hf_reference.py defaults); S = 4 needs >= 4 experts.
FAMILIES = {
    # top-1 of 5 (odd: 3+2 and 2+1+1+1 experts per shard), head_dim 20 != hidden 48 / 4 heads
    "mixtral": dict(num_local_experts=5, num_experts_per_tok=1, head_dim=20),
    # top-4 of 8 without renormalisation, a dense first layer, shared expert
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[0],
                      num_hidden_layers=3),
    # top-3 of 5, renormalised, a dense first layer
    "qwen3_moe": dict(num_experts=5, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0]),
    # MLA, latent KV cache, group-limited sigmoid routing, shared expert, dense first layer
    "deepseek_v3": {},
    # q/k norm, shared MLP
    "hunyuan_v1_moe": {},
    # top-2 of 5, clip_qkv
    "olmoe": dict(num_experts=5, num_experts_per_tok=2, clip_qkv=0.5),
    # sinks, sliding-window layers, router and expert biases, fused experts
    "gpt_oss": {},
}
# and DeepSeek-V3's own checkpoint format: block-wise FP8 projections (serving/model/quantization.py),
# transformers' reference loading the same FP8 files
CASES = [(family, s, "float") for family in FAMILIES for s in SHARDS] + [("deepseek_v3", 2, "fp8")]
FP8 = FP8BlockQuant(block_rows=8, block_cols=8)       # hf_reference's deepseek_v3 dims are whole blocks of 8

SHARD_INFO = """
app = serve.status().applications["moe"]
shards = sorted(n for n in app.deployments if n.startswith("ExpertShard"))
print(json.dumps({"deployments": shards, "all": sorted(app.deployments),
                  "describe": [serve.get_deployment_handle(n, app_name="moe").describe.remote().result()
                               for n in shards]}))
"""


class Cluster:
    """One cluster for the module: `up` on the first deploy, `moe-serve redeploy` after that."""

    def __init__(self, state_dir: Path, config: Path):
        self.state_dir, self.config, self.state, self._running, self._up_failed = state_dir, config, None, None, False

    def deploy(self, checkpoint: Path, shards: int) -> dict:
        if self._up_failed:
            pytest.fail("the cluster failed to start in an earlier case")
        if self._running is None:
            running = running_cluster(checkpoint, self.state_dir, shards=shards, nodes=2, config=self.config)
            try:
                self.state = running.__enter__()      # on failure it has already run `moe-serve down`
            except BaseException:
                self._up_failed = True
                raise
            self._running = running
        else:
            moe_serve("redeploy", "--state-dir", str(self.state_dir), "--checkpoint", str(checkpoint),
                      "--expert-shards", str(shards), timeout=600)
        return self.state

    def stop(self) -> None:
        if self._running is not None:     # `moe-serve down`, then: no process it started is left
            self._running.__exit__(None, None, None)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for d in cfg["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
    # chunked streaming on for every request (the shipped config has it off; test_cluster_e2e
    # covers one token per message): up to 4 tokens per GenerateResponse after the first
    cfg["applications"][0]["args"].update(stream_chunk_tokens=4, stream_chunk_min_running=0)
    # and the Ingress deployment in front of the engine (the shipped config, and test_cluster_e2e,
    # have the engine replica answer the gRPC proxy itself)
    cfg["applications"][0]["args"].update(ingress="deployment")
    # and the engine core in a process of its own (serving/deployments/engine_core.py; by default only
    # with the collective transport): the tokens cross its socket as well
    cfg["applications"][0]["args"].update(engine_process=True)
    # and speculative decoding (n-gram drafts, serving/engine/speculative.py): greedy, at most 4
    # sequences running, so every case drafts; the tokens must still be transformers' one-a-step ones
    cfg["applications"][0]["args"].update(speculative_tokens=4, speculative_max_seqs=4)
    (tmp / "serve_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    c = Cluster(tmp / "state", tmp / "serve_config.yaml")
    try:
        yield c
    finally:
        c.stop()


def _hf_greedy(hf, ids, n=NEW_TOKENS):
    return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()


@pytest.mark.parametrize("family,shards,weights", CASES,
                         ids=[f"{f}-S{s}" + ("" if w == "float" else f"-{w}") for f, s, w in CASES])
def test_greedy_parity_through_the_cluster(family, shards, weights, cluster, tmp_path):
    seed = SHARDS.index(shards) + 1
    path, hf = build_hf_checkpoint(tmp_path / "ckpt", family, seed=seed, vocab_size=VOCAB,
                                   max_position_embeddings=256, **FAMILIES[family])
    if weights == "fp8":
        assert quantize_hf_checkpoint(path, FP8) > 0
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    write_tokenizer(path, VOCAB)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]

    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as bg:            # transformers' reference while the cluster (re)deploys
        deployed = bg.submit(cluster.deploy, path, shards)
        expected = [_hf_greedy(hf, ids) for ids in prompts]
        state = deployed.result()
    t_deploy = time.monotonic() - t0
    now = read_state(Path(state["state_dir"]))
    assert (now["checkpoint"], now["expert_shards"]) == (str(path.resolve()), shards)

    # where the shards run and what they hold (a driver attached to the cluster), meanwhile the requests
    with ThreadPoolExecutor(1 + len(prompts)) as pool:
        shard_info = pool.submit(ray_query, state, SHARD_INFO)
        out = moe_serve("generate", "--target", state["grpc_target"], "--prompt-ids", ",".join(map(str, prompts[0])),
                        "--max-tokens", str(NEW_TOKENS), "--temperature", "0", "--json")
        assert json.loads(out.stdout)["token_ids"] == expected[0]
        longest = max(range(len(prompts)), key=lambda i: len(expected[i]))   # greedy may stop at EOS early
        with MoEClient(state["grpc_target"]) as c:       # the stream itself: chunks, every token once
            chunks = [list(m.token_ids) for m in c.generate(build_request(
                prompt_ids=prompts[longest], max_tokens=NEW_TOKENS, temperature=0))]
        assert [t for ch in chunks for t in ch] == expected[longest]
        assert len(chunks[0]) == 1 and len(chunks) <= 1 + -(-(len(expected[longest]) - 1) // 2), \
            [len(ch) for ch in chunks]          # after the first token, two or more per message

        def one(ids):
            with MoEClient(state["grpc_target"]) as c:
                return list(c.complete(build_request(prompt_ids=ids, max_tokens=NEW_TOKENS, temperature=0)).token_ids)

        results = list(pool.map(one, prompts, timeout=300))    # one continuous batch, 4 different lengths
        for ids, got, want in zip(prompts, results, expected):
            assert got == want, f"prompt of length {len(ids)}"
        info = shard_info.result(timeout=300)

    # exactly S shard deployments (a redeploy removes the previous app's), every expert held once
    assert info["deployments"] == [f"ExpertShard{s}" for s in range(shards)]
    assert "Ingress" in info["all"] and "EngineReplica" in info["all"]    # the two-hop data path
    held = {}
    for d in info["describe"]:
        for layer, experts in d["experts"].items():
            held.setdefault(layer, []).extend(experts)
    n_experts = MoEConfig.from_dir(path).num_experts
    assert held and all(sorted(e) == list(range(n_experts)) for e in held.values()), held
    if shards > 1:
        assert len({d["node_id"] for d in info["describe"]}) == 2      # the shards span both nodes
    print(f"[{family} S={shards} {weights}: deploy {t_deploy:.1f}s, requests+checks {time.monotonic() - t0 - t_deploy:.1f}s]",
          end=" ", flush=True)


def test_the_cases_were_served_with_accepted_drafts(cluster):
    """After the cases above (this module's order): the engine drafted, and the model agreed with
    some drafts, so the tokens above came partly from accepted drafts (the metrics endpoint)."""
    import urllib.request
    if cluster.state is None:
        pytest.skip("no case ran in this session")
    deadline = time.monotonic() + 20          # replicas push their counters every 0.5 s
    while True:
        with urllib.request.urlopen(cluster.state["metrics_url"], timeout=10) as r:
            text = r.read().decode()
        accepted = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                       if l.startswith("moe_serve_spec_decode_accepted_tokens_total{"))
        if accepted > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert accepted > 0, "no draft token was accepted"
