"""Test-only reference: checkpoints built and run by transformers itself, and our model loaded from them.

Reuse from any test:  path, hf = build_hf_checkpoint(tmp_path, "mixtral", num_local_experts=4)
                      model, dispatch = load_ours(path)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers
from safetensors.torch import load_file, save_file

from serving.model.config import MoEConfig
from serving.model.kv_cache import KVCache
from serving.model.model import BatchLayout, MoEModel
from serving.model.moe import ExpertDispatch, local_dispatch
from serving.model.quantization import (GPT_OSS_MXFP4_CONFIG, SCALE_SUFFIX, FP8BlockQuant, hf_quantization_config,
                                        mxfp4_experts, quantize_tensors)
from serving.model.weights import CheckpointReader, load_all_experts

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

_CLASSES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    "hunyuan_v1_moe": (transformers.HunYuanMoEV1Config, transformers.HunYuanMoEV1ForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
}
# Small, deliberately odd defaults: head_dim (16) != hidden / heads (12), GQA 4:2.
_DEFAULTS = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
_FAMILY_DEFAULTS = {
    "mixtral": dict(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=56, moe_intermediate_size=40, shared_expert_intermediate_size=44,
                      num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=56, moe_intermediate_size=40, num_experts=4, num_experts_per_tok=2),
    # MLA: q_lora 24, kv_lora 16, nope 12 + rope 8 (qk 20), v 10; head_dim / num_key_value_heads are derived
    "deepseek_v3": dict(head_dim=None, num_key_value_heads=4, intermediate_size=56, moe_intermediate_size=40,
                        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                        routed_scaling_factor=2.5, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12,
                        qk_rope_head_dim=8, v_head_dim=10, first_k_dense_replace=1),
    "hunyuan_v1_moe": dict(intermediate_size=40, num_experts=4, moe_topk=2),
    # olmoe's q_norm spans hidden_size, so head_dim is hidden / heads
    "olmoe": dict(head_dim=None, intermediate_size=40, num_experts=4, num_experts_per_tok=2, eos_token_id=2),
    "gpt_oss": dict(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
}


def hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    config_cls, _ = _CLASSES[family]
    kwargs = {**_DEFAULTS, **_FAMILY_DEFAULTS[family], **overrides}
    return config_cls(**{k: v for k, v in kwargs.items() if v is not None})   # None: leave the family default


def build_hf_checkpoint(out_dir: str | Path, family: str, seed: int = 0, max_shard_size: str | None = None,
                        legacy_config: bool = False, **overrides):
    """Seeded transformers model saved with `save_pretrained`; returns (dir, model in eval mode, fp32).

    Norm weights, biases (incl. gpt_oss expert biases) and deepseek's e_score_correction_bias are perturbed
    away from 1 / 0 so they are really tested.
    `legacy_config` rewrites config.json with v4 keys (`rope_theta`, no `head_dim` when it's the default).
    """
    _, model_cls = _CLASSES[family]
    torch.manual_seed(seed)
    model = model_cls(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    out = Path(out_dir)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if legacy_config:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        if cfg.get("head_dim") == cfg["hidden_size"] // cfg["num_attention_heads"]:
            cfg.pop("head_dim")
        cfg_path.write_text(json.dumps(cfg))
    return out, model


def quantize_hf_checkpoint(path: Path, q: FP8BlockQuant) -> int:
    """Rewrite a single-file save_pretrained checkpoint in place as block-wise FP8 (DeepSeek-V3's
    format: serving/model/quantization.py); returns how many tensors were quantized. transformers
    then loads it through its FineGrainedFP8 quantizer (dequantized on a machine without FP8 GEMMs),
    which needs every quantized dim to be whole blocks."""
    tensors = load_file(path / "model.safetensors")
    quantized = quantize_tensors(tensors, q)
    save_file(quantized, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = hf_quantization_config(q)
    (path / "config.json").write_text(json.dumps(cfg))
    return sum(1 for n in quantized if n.endswith(SCALE_SUFFIX))


def mxfp4_hf_checkpoint(path: Path) -> None:
    """Rewrite a single-file gpt_oss save_pretrained checkpoint in place with its experts in MXFP4,
    as openai/gpt-oss ships them; its hidden and intermediate sizes must be multiples of 32."""
    save_file(mxfp4_experts(load_file(path / "model.safetensors")), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = GPT_OSS_MXFP4_CONFIG
    (path / "config.json").write_text(json.dumps(cfg))


def load_ours(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MoEModel, ExpertDispatch]:
    """Our model (dense weights) plus the local dispatch over all experts."""
    model = MoEModel.from_checkpoint(checkpoint_dir, dtype=dtype)
    return model, local_dispatch(load_all_experts(CheckpointReader(checkpoint_dir), model.config, dtype))


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[T, V] fp32 logits of one full forward."""
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Token ids of `generate(do_sample=False)`, never stopping at EOS."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = saved
    return out[0, len(ids):].tolist()


def our_prefill_logits(model: MoEModel, dispatch: ExpertDispatch, ids: list[int]) -> torch.Tensor:
    kv = KVCache(model.config, 1, len(ids), model.dtype)
    return model.forward(torch.tensor(ids), BatchLayout((0,), (0,), (len(ids),)), kv, dispatch, all_logits=True)


def our_greedy(model: MoEModel, dispatch: ExpertDispatch, ids: list[int], max_new_tokens: int) -> list[int]:
    kv = KVCache(model.config, 1, len(ids) + max_new_tokens, model.dtype)
    logits = model.forward(torch.tensor(ids), BatchLayout((0,), (0,), (len(ids),)), kv, dispatch)
    out = []
    for _ in range(max_new_tokens):
        out.append(int(logits[0].argmax()))
        logits = model.forward(torch.tensor(out[-1:]), BatchLayout((0,), (len(ids) + len(out) - 1,), (1,)), kv, dispatch)
    return out


def batched_decode_vs_hf(model: MoEModel, dispatch: ExpertDispatch, hf, lengths=(4, 11, 7), slots=(3, 0, 2),
                         seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of `lengths` random ids in scattered `slots`: prefill all but the last id of each in one
    step, then a decode-only step (one new token per sequence) -> (our logits [B, V], transformers' [B, V])."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    kv = KVCache(model.config, max(slots) + 1, 32)
    prompts = [s[:-1] for s in seqs]
    model.forward(torch.tensor(sum(prompts, [])), BatchLayout(slots, (0,) * len(seqs), tuple(map(len, prompts))),
                  kv, dispatch)
    ours = model.forward(torch.tensor([s[-1] for s in seqs]),
                         BatchLayout(slots, tuple(map(len, prompts)), (1,) * len(seqs)), kv, dispatch)
    return ours, torch.stack([hf_logits(hf, s)[-1] for s in seqs])


def config_of(checkpoint_dir: str | Path) -> MoEConfig:
    return MoEConfig.from_dir(checkpoint_dir)
