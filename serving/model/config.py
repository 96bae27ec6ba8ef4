"""Typed, frozen model configuration, read from a Hugging Face `config.json`.

One `MoEConfig` describes every supported family; family-specific switches are plain
fields (e.g. `shared_expert_intermediate_size == 0` means "no shared expert").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe")


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    family: str                      # one of SUPPORTED_FAMILIES (HF `model_type`)
    vocab_size: int
    hidden_size: int                 # D
    num_layers: int                  # L
    num_heads: int                   # H (query heads)
    num_kv_heads: int                # Hkv
    head_dim: int                    # may differ from D // H
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    num_experts: int                 # E routed experts per MoE layer
    top_k: int                       # K
    moe_intermediate_size: int       # I of one routed expert
    norm_topk_prob: bool             # renormalise the top-k softmax weights
    moe_layers: tuple[bool, ...]     # per layer: True = sparse MoE block, False = dense MLP
    dense_intermediate_size: int = 0           # I of the dense MLP layers (0 if none)
    shared_expert_intermediate_size: int = 0   # 0 = no shared expert (qwen2_moe has one)
    attention_bias: bool = False               # q/k/v projections carry a bias (qwen2_moe)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, sparse in enumerate(self.moe_layers) if sparse)

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> "MoEConfig":
        with open(Path(checkpoint_dir) / "config.json") as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "MoEConfig":
        """Map an HF `config.json` dict (transformers v4 or v5 keys) to a `MoEConfig`.

        Raises ValueError naming the field for an unsupported family or a missing/unsupported field.
        Optional fields take the defaults transformers 5.24 gives them.
        """
        family = hf.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"config.json: unsupported model_type {family!r} (supported: {SUPPORTED_FAMILIES})")

        def req(key: str):
            if hf.get(key) is None:
                raise ValueError(f"config.json ({family}): missing required field {key!r}")
            return hf[key]

        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"config.json: unsupported rope_parameters.rope_type {rope.get('rope_type')!r}")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA[family]))
        hidden, heads, num_layers = req("hidden_size"), req("num_attention_heads"), req("num_hidden_layers")
        eos = hf.get("eos_token_id")
        common = dict(
            family=family, vocab_size=req("vocab_size"), hidden_size=hidden, num_layers=num_layers,
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", _DEFAULT_EPS[family])), rope_theta=float(rope_theta),
            max_position_embeddings=int(hf.get("max_position_embeddings", _DEFAULT_MAX_POS[family])),
            top_k=req("num_experts_per_tok"), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        )
        if heads % common["num_kv_heads"] or common["head_dim"] % 2:
            raise ValueError(f"config.json: num_attention_heads {heads} must be a multiple of num_key_value_heads "
                             f"{common['num_kv_heads']} and head_dim {common['head_dim']} even")
        if family == "mixtral":
            return cls(**common, num_experts=req("num_local_experts"), moe_intermediate_size=req("intermediate_size"),
                       norm_topk_prob=True, moe_layers=(True,) * num_layers, sliding_window=hf.get("sliding_window"))
        # qwen2_moe: dense MLP on `mlp_only_layers` and on layers off the `decoder_sparse_step` grid.
        if hf.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=True is not supported for qwen2_moe")
        num_experts, step, dense_only = req("num_experts"), hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
        moe_layers = tuple(i not in dense_only and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
        return cls(**common, num_experts=num_experts, moe_intermediate_size=req("moe_intermediate_size"),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)), moe_layers=moe_layers,
                   dense_intermediate_size=req("intermediate_size") if not all(moe_layers) else 0,
                   shared_expert_intermediate_size=req("shared_expert_intermediate_size"),
                   attention_bias=bool(hf.get("qkv_bias", True)))


_DEFAULT_THETA = {"mixtral": 1e6, "qwen2_moe": 1e4}   # transformers 5.24 `default_theta`
_DEFAULT_EPS = {"mixtral": 1e-5, "qwen2_moe": 1e-6}
_DEFAULT_MAX_POS = {"mixtral": 4096 * 32, "qwen2_moe": 32768}
