"""Greedy parity through the whole cluster, for every family (Mixtral at S = 2 is in
test_cluster_e2e.py): `moe-serve generate --json --temperature 0` returns transformers' greedy
tokens, alone and with concurrent requests of different lengths in one continuous batch."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cluster_harness import moe_serve, ray_query, running_cluster
from hf_reference import build_hf_checkpoint
from serving.client import MoEClient, build_request
from serving.model.checkpoint import write_tokenizer
from serving.model.config import MoEConfig

pytestmark = pytest.mark.cluster
VOCAB = 300

CASES = [
    # Mixtral at S=1: top-1 of 3 experts, head_dim 20 != 48/4
    ("mixtral", 1, dict(num_local_experts=3, num_experts_per_tok=1, head_dim=20)),
    # Qwen2-MoE at S=4: 8 experts top-4 without renormalisation, a dense first layer, shared expert
    ("qwen2_moe", 4, dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[0],
                          num_hidden_layers=3)),
    # the other families, through the whole cluster too (shapes: tests/hf_reference.py)
    ("qwen3_moe", 4, {}),
    ("deepseek_v3", 2, {}),          # MLA, latent KV cache, group-limited sigmoid routing, dense first layer
    ("hunyuan_v1_moe", 1, {}),
    ("olmoe", 2, {}),
    ("gpt_oss", 4, {}),              # sinks, sliding-window layers, fused experts
]


def _hf_greedy(hf, ids, n=32):
    return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()


@pytest.mark.parametrize("family,shards,overrides", CASES, ids=[f"{f}-S{s}" for f, s, _ in CASES])
def test_greedy_parity_through_the_cluster(family, shards, overrides, tmp_path):
    path, hf = build_hf_checkpoint(tmp_path / "ckpt", family, seed=shards, vocab_size=VOCAB,
                                   max_position_embeddings=256, **overrides)
    write_tokenizer(path, VOCAB)
    g = torch.Generator().manual_seed(shards)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 29, 2, 14)]
    with running_cluster(path, tmp_path / "state", shards=shards, nodes=2) as state:
        out = moe_serve("generate", "--target", state["grpc_target"], "--prompt-ids",
                        ",".join(map(str, prompts[0])), "--max-tokens", "32", "--temperature", "0", "--json")
        assert json.loads(out.stdout)["token_ids"] == _hf_greedy(hf, prompts[0])

        def one(ids):
            with MoEClient(state["grpc_target"]) as c:
                return list(c.complete(build_request(prompt_ids=ids, max_tokens=32, temperature=0)).token_ids)

        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(one, prompts, timeout=300))
        for ids, got in zip(prompts, results):
            assert got == _hf_greedy(hf, ids), f"prompt of length {len(ids)}"

        info = ray_query(state, f"""
print(json.dumps([serve.get_deployment_handle(f"ExpertShard{{s}}", app_name="moe").describe.remote().result()
                  for s in range({shards})]))
""")
        held = {}
        for d in info:
            for layer, experts in d["experts"].items():
                held.setdefault(layer, []).extend(experts)
        n_experts = MoEConfig.from_dir(path).num_experts
        for layer, experts in held.items():      # every expert held exactly once across shards
            assert sorted(experts) == list(range(n_experts)), layer
        if shards > 1:
            assert len({d["node_id"] for d in info}) == 2   # 4 shards spread over both nodes
