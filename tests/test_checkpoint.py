"""Config parsing, checkpoint loading (single file, sharded, fused v5 experts), writer and tokenizer."""
from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from serving.model.checkpoint import write_checkpoint
from serving.model.config import MoEConfig
from serving.model.tokenizer import IncrementalDetokenizer, Tokenizer
from serving.model.weights import CheckpointReader, load_all_experts, load_dense_weights, load_expert
from tests.hf_reference import build_hf_checkpoint, hf_logits, load_ours, our_prefill_logits

PROMPT = [1, 5, 9, 33, 70, 2, 41]


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory):
    return build_hf_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", num_local_experts=3)


def _hf_dict(path) -> dict:
    return json.loads((path / "config.json").read_text())


# ---- config -----------------------------------------------------------------------------------

def test_unsupported_model_type_names_field(mixtral_ckpt):
    hf = {**_hf_dict(mixtral_ckpt[0]), "model_type": "llama"}
    with pytest.raises(ValueError, match="model_type"):
        MoEConfig.from_hf_dict(hf)


@pytest.mark.parametrize("field", ["hidden_size", "num_local_experts", "num_experts_per_tok", "vocab_size"])
def test_missing_config_field_is_named(mixtral_ckpt, field):
    hf = _hf_dict(mixtral_ckpt[0])
    del hf[field]
    with pytest.raises(ValueError, match=field):
        MoEConfig.from_hf_dict(hf)


def test_config_key_variants():
    base = dict(model_type="qwen2_moe", vocab_size=10, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=32, moe_intermediate_size=16,
                shared_expert_intermediate_size=8, num_experts=4, num_experts_per_tok=2)
    c = MoEConfig.from_hf_dict({**base, "rope_theta": 500.0, "eos_token_id": [2, 7], "mlp_only_layers": [0],
                                "decoder_sparse_step": 2})
    assert (c.rope_theta, c.head_dim, c.eos_token_ids) == (500.0, 16, (2, 7))
    assert c.moe_layers == (False, True, False, True) and c.moe_layer_ids == (1, 3)
    assert c.dense_intermediate_size == 32 and c.shared_expert_intermediate_size == 8 and c.attention_bias
    c = MoEConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0},
                                "head_dim": 40, "eos_token_id": 2})
    assert (c.rope_theta, c.head_dim, c.eos_token_ids, c.moe_layers) == (7.0, 40, (2,), (True,) * 4)
    assert c.dense_intermediate_size == 0
    with pytest.raises(ValueError, match="rope_type"):
        MoEConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 7.0, "factor": 4.0}})


# ---- loading ----------------------------------------------------------------------------------

def _rewrite(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    path, _ = build_hf_checkpoint(tmp_path, "qwen2_moe")
    name = "model.layers.1.mlp.shared_expert_gate.weight"
    _rewrite(path, lambda t: t.pop(name))
    config = MoEConfig.from_dir(path)
    with pytest.raises((KeyError, ValueError), match=name.replace(".", r"\.")):
        load_dense_weights(CheckpointReader(path), config)
    _rewrite(path, lambda t: t.pop("model.layers.0.mlp.experts.2.up_proj.weight"))
    with pytest.raises((KeyError, ValueError), match=r"experts\.2\.up_proj"):
        load_expert(CheckpointReader(path), config, 0, 2)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    path, _ = build_hf_checkpoint(tmp_path, "mixtral")
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(path, lambda t: t.update({name: torch.zeros(8, 48)}))
    with pytest.raises(ValueError) as err:
        load_dense_weights(CheckpointReader(path), MoEConfig.from_dir(path))
    assert name in str(err.value) and "(8, 48)" in str(err.value) and "(32, 48)" in str(err.value)


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    path, hf = build_hf_checkpoint(tmp_path, "qwen2_moe", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 2
    reader = CheckpointReader(path)
    assert set(reader.names()) == set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
    torch.testing.assert_close(our_prefill_logits(*load_ours(path), PROMPT), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_load_expert_reads_one_expert(mixtral_ckpt):
    path, hf = mixtral_ckpt
    config = MoEConfig.from_dir(path)
    w = load_expert(CheckpointReader(path), config, layer=1, expert=2)
    ref = hf.model.layers[1].mlp.experts
    I = config.moe_intermediate_size
    torch.testing.assert_close(w.gate_ID, ref.gate_up_proj[2, :I], atol=0, rtol=0)
    torch.testing.assert_close(w.up_ID, ref.gate_up_proj[2, I:], atol=0, rtol=0)
    torch.testing.assert_close(w.down_DI, ref.down_proj[2], atol=0, rtol=0)
    assert load_expert(CheckpointReader(path), config, 0, 1, dtype=torch.bfloat16).gate_ID.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        load_expert(CheckpointReader(path), config, 0, 3)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_v5_expert_layout(tmp_path, family):
    """A checkpoint in transformers v5's in-memory layout (`mlp.experts.gate_up_proj` [E, 2I, D])."""
    legacy, hf = build_hf_checkpoint(tmp_path / "legacy", family)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((legacy / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight" or
             not hf.config.tie_word_embeddings}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    config = MoEConfig.from_dir(fused)
    a = load_all_experts(CheckpointReader(legacy), config)
    b = load_all_experts(CheckpointReader(fused), config)
    for l in a:
        for e in a[l]:
            for field in ("gate_ID", "up_ID", "down_DI"):
                assert torch.equal(getattr(a[l][e], field), getattr(b[l][e], field))
    torch.testing.assert_close(our_prefill_logits(*load_ours(fused), PROMPT), hf_logits(hf, PROMPT),
                               atol=1e-4, rtol=0)


# ---- writer -----------------------------------------------------------------------------------

def test_write_small_is_sharded_and_fast(tmp_path):
    t0 = time.perf_counter()
    path = write_checkpoint("mixtral", "small", tmp_path / "small")
    assert time.perf_counter() - t0 < 20
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    config = MoEConfig.from_dir(path)
    assert (config.hidden_size, config.num_layers, config.num_experts, config.top_k, config.moe_intermediate_size,
            config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == \
        (512, 4, 8, 2, 1024, 8, 2, 64, 32000)
    reader = CheckpointReader(path)
    assert load_expert(reader, config, 3, 7).down_DI.shape == (512, 1024)
    tok = Tokenizer.from_dir(path)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", 32000, 1, 2)
    assert tok.encode("Hello world") == [1, 22557, 1526]


def test_write_checkpoint_is_deterministic(tmp_path):
    a = write_checkpoint("qwen2_moe", "tiny", tmp_path / "a", seed=5)
    b = write_checkpoint("qwen2_moe", "tiny", tmp_path / "b", seed=5)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="family"):
        write_checkpoint("llama", "tiny", tmp_path / "c")


# ---- tokenizer --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["tiny", "small"])
def tokenizer(request, tmp_path_factory):
    path = write_checkpoint("mixtral", request.param, tmp_path_factory.mktemp(request.param))
    return Tokenizer.from_dir(path)


TEXT = "Hello world, naïve café — 日本語 🙂 🦜 龘 and the quick brown fox!"


def test_tokenizer_roundtrip_and_bos(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert ids[0] == tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    assert tokenizer.encode(TEXT, add_bos=False) == ids[1:]
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == TEXT


def test_incremental_detokenizer_matches_full_decode(tokenizer):
    ids = tokenizer.encode(TEXT, add_bos=False)
    det = IncrementalDetokenizer(tokenizer)
    deltas = [det.push(i) for i in ids]
    assert "".join(deltas) == det.text == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas   # multi-token characters were held back until complete
