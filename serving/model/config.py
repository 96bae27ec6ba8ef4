"""Typed, frozen model configuration, read from a Hugging Face `config.json`.

One `MoEConfig` describes every supported family; family-specific switches are plain fields
(e.g. `shared_expert_intermediate_size == 0` means "no shared expert") or small nested frozen
configs: `RopeConfig` (rotary variant), `RouterConfig` (how the gate picks experts) and
`MLAConfig` (DeepSeek multi-head latent attention; None = ordinary GQA).
Every default is the one transformers 5.24 gives a field that config.json leaves out.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from serving.model.quantization import MXFP4Quant, WeightQuant, quantization_from_hf

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "hunyuan_v1_moe", "olmoe", "gpt_oss")

QK_NORMS = (None, "head", "head_after_rope", "full")


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeConfig:
    """Rotary embedding over the first `dim` dims of each (rope part of a) head."""
    rope_type: str = "default"          # default | yarn | ntk_alpha (HunYuan "dynamic" with a fixed alpha)
    theta: float
    dim: int
    interleave: bool = False            # deepseek_v3 `rope_interleave`: rotary pairs are (x0, x1), (x2, x3), ...
    factor: float = 1.0                 # yarn
    original_max_position_embeddings: int = 0   # yarn
    beta_fast: float = 32.0             # yarn
    beta_slow: float = 1.0              # yarn
    truncate: bool = True               # yarn
    attention_factor: float = 1.0       # scales cos/sin (yarn mscale), resolved at parse time
    alpha: float = 1.0                  # ntk_alpha


@dataclass(frozen=True, kw_only=True, slots=True)
class RouterConfig:
    """How the gate turns router logits [T, E] into top-k (weights, ids); see `moe.route`."""
    top_k: int
    scoring: str = "softmax"            # softmax (softmax -> top-k) | topk_softmax (top-k logits -> softmax) | sigmoid
    norm_topk_prob: bool = False        # renormalise the chosen k weights to sum 1
    n_group: int = 1                    # sigmoid: group-limited top-k over n_group groups ...
    topk_group: int = 1                 # ... of which the best topk_group are eligible
    routed_scaling_factor: float = 1.0
    bias: bool = False                  # the router linear has a bias (gpt_oss)
    score_correction_bias: bool = False  # deepseek_v3 `e_score_correction_bias` (selection only)
    fp32: bool = False                  # router weight kept in fp32 and applied to fp32 activations


@dataclass(frozen=True, kw_only=True, slots=True)
class MLAConfig:
    """DeepSeek multi-head latent attention. The KV cache holds the normed latent + the rope'd k_pe."""
    q_lora_rank: int | None             # None = plain q_proj
    kv_lora_rank: int                   # R
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float                # qk_head_dim**-0.5, times mscale**2 under yarn with mscale_all_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    family: str                      # one of SUPPORTED_FAMILIES (HF `model_type`)
    vocab_size: int
    hidden_size: int                 # D
    num_layers: int                  # L
    num_heads: int                   # H (query heads)
    num_kv_heads: int                # Hkv (MLA: = H)
    head_dim: int                    # may differ from D // H (MLA: qk_head_dim)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    num_experts: int                 # E routed experts per MoE layer
    top_k: int                       # K
    moe_intermediate_size: int       # I of one routed expert
    norm_topk_prob: bool             # renormalise the top-k weights (mirrored in `router`)
    moe_layers: tuple[bool, ...]     # per layer: True = sparse MoE block, False = dense MLP
    dense_intermediate_size: int = 0           # I of the dense MLP layers (0 if none)
    shared_expert_intermediate_size: int = 0   # 0 = no shared expert
    shared_expert_gated: bool = True           # qwen2_moe: sigmoid(shared_expert_gate(x)) * shared(x)
    attention_bias: bool = False               # q/k/v projections carry a bias
    o_proj_bias: bool = False                  # o_proj carries a bias (qwen3_moe/olmoe/hunyuan/gpt_oss attention_bias)
    qk_norm: str | None = None                 # one of QK_NORMS: RMSNorm on q/k per head, per head after rope, or
                                               # over the whole projection (olmoe)
    clip_qkv: float | None = None              # olmoe: clamp q/k/v to [-clip, clip]
    attention_sinks: bool = False              # gpt_oss: a learned per-head logit joins every softmax
    layer_windows: tuple[int | None, ...] = ()  # per-layer sliding window (gpt_oss layer_types); () = all `sliding_window`
    swiglu_limit: float | None = None          # gpt_oss clamped SwiGLU (routed experts)
    swiglu_alpha: float = 1.702
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope: RopeConfig | None = field(default=None)      # None: default RoPE from rope_theta/head_dim
    router: RouterConfig | None = field(default=None)  # None: softmax top-k from top_k/norm_topk_prob
    mla: MLAConfig | None = None                        # None: GQA attention
    quantization: WeightQuant | None = None             # weights on disk in FP8 / MXFP4 (quantization.py)

    def __post_init__(self):
        if self.rope is None:
            object.__setattr__(self, "rope", RopeConfig(theta=self.rope_theta, dim=self.head_dim))
        if self.router is None:
            object.__setattr__(self, "router", RouterConfig(top_k=self.top_k, norm_topk_prob=self.norm_topk_prob))
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm {self.qk_norm!r} not in {QK_NORMS}")

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

        def req(*keys: str):
            for key in keys:
                if hf.get(key) is not None:
                    return hf[key]
            raise ValueError(f"config.json ({family}): missing required field {' / '.join(map(repr, keys))}")

        quantization = None
        if hf.get("quantization_config"):
            try:
                quantization = quantization_from_hf(hf["quantization_config"])
            except ValueError as e:
                raise ValueError(f"config.json ({family}): {e}") from None
            if isinstance(quantization, MXFP4Quant) and family != "gpt_oss":
                raise ValueError(f"config.json ({family}): quantization_config.quant_method 'mxfp4' is "
                                 "supported for gpt_oss's fused experts only")
        if family != "gpt_oss" and hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
        hidden, heads, num_layers = req("hidden_size"), req("num_attention_heads"), req("num_hidden_layers")
        max_pos = int(hf.get("max_position_embeddings", _DEFAULT_MAX_POS[family]))
        eos = hf.get("eos_token_id", _DEFAULT_EOS.get(family))
        common = dict(
            quantization=quantization, family=family, vocab_size=req("vocab_size"), hidden_size=hidden, num_layers=num_layers,
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", _DEFAULT_EPS[family])),
            max_position_embeddings=max_pos, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id", _DEFAULT_BOS.get(family)),
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        )
        if family == "deepseek_v3":
            return _deepseek_v3(cls, hf, common, req)
        rope = _rope(hf, family, common["head_dim"], max_pos)
        common.update(rope_theta=rope.theta, rope=rope)
        if heads % common["num_kv_heads"] or common["head_dim"] % 2:
            raise ValueError(f"config.json: num_attention_heads {heads} must be a multiple of num_key_value_heads "
                             f"{common['num_kv_heads']} and head_dim {common['head_dim']} even")
        all_moe = (True,) * num_layers

        def softmax_router(top_k: int, norm: bool, **kw) -> dict:
            return dict(top_k=top_k, norm_topk_prob=norm, router=RouterConfig(top_k=top_k, norm_topk_prob=norm, **kw))

        if family == "mixtral":
            return cls(**common, **softmax_router(req("num_experts_per_tok"), True),
                       num_experts=req("num_local_experts"), moe_intermediate_size=req("intermediate_size"),
                       moe_layers=all_moe, sliding_window=hf.get("sliding_window"))
        if family in ("qwen2_moe", "qwen3_moe"):
            # dense MLP on `mlp_only_layers` and on layers off the `decoder_sparse_step` grid.
            num_experts = req("num_experts", "num_local_experts")
            step, dense_only = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
            moe_layers = tuple(i not in dense_only and num_experts > 0 and (i + 1) % step == 0
                               for i in range(num_layers))
            kw = dict(num_experts=num_experts, moe_intermediate_size=req("moe_intermediate_size"),
                      moe_layers=moe_layers,
                      dense_intermediate_size=req("intermediate_size") if not all(moe_layers) else 0,
                      **softmax_router(req("num_experts_per_tok"), bool(hf.get("norm_topk_prob", False))))
            if family == "qwen2_moe":
                if hf.get("use_sliding_window"):
                    raise ValueError("config.json: use_sliding_window=True is not supported for qwen2_moe")
                return cls(**common, **kw, shared_expert_intermediate_size=req("shared_expert_intermediate_size"),
                           attention_bias=bool(hf.get("qkv_bias", True)))
            bias = bool(hf.get("attention_bias", False))
            return cls(**common, **kw, attention_bias=bias, o_proj_bias=bias, qk_norm="head",
                       sliding_window=hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None)
        if family == "hunyuan_v1_moe":
            num_experts = _uniform(req("num_experts", "num_local_experts"), "num_experts")
            top_k = _uniform(req("moe_topk", "num_experts_per_tok"), "moe_topk")
            inter, bias = req("intermediate_size"), bool(hf.get("attention_bias", False))
            return cls(**common, **softmax_router(top_k, True, fp32=True), num_experts=num_experts,
                       moe_intermediate_size=inter, moe_layers=all_moe, shared_expert_intermediate_size=inter,
                       shared_expert_gated=False, attention_bias=bias, o_proj_bias=bias, qk_norm="head_after_rope")
        if family == "olmoe":
            if common["head_dim"] != hidden // heads:
                raise ValueError(f"config.json (olmoe): head_dim {common['head_dim']} must equal hidden_size // "
                                 f"num_attention_heads = {hidden // heads} (q_norm spans hidden_size)")
            bias = bool(hf.get("attention_bias", False))
            return cls(**common, **softmax_router(req("num_experts_per_tok"), bool(hf.get("norm_topk_prob", False))),
                       num_experts=req("num_experts", "num_local_experts"),
                       moe_intermediate_size=req("intermediate_size"), moe_layers=all_moe, attention_bias=bias,
                       o_proj_bias=bias, qk_norm="full", clip_qkv=hf.get("clip_qkv"))
        # gpt_oss: alternating sliding/full attention with sinks, biased router and clamped-SwiGLU experts
        window = hf.get("sliding_window", 128)
        layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                                for i in range(num_layers)]
        if len(layer_types) != num_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"config.json (gpt_oss): layer_types {layer_types} must be {num_layers} entries of "
                             "'sliding_attention' | 'full_attention'")
        bias = bool(hf.get("attention_bias", True))
        return cls(**common, **softmax_router(req("num_experts_per_tok"), False, scoring="topk_softmax", bias=True),
                   num_experts=req("num_local_experts", "num_experts"), moe_intermediate_size=req("intermediate_size"),
                   moe_layers=all_moe, attention_bias=bias, o_proj_bias=bias, attention_sinks=True,
                   layer_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
                   sliding_window=window, swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                   swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)))


def _uniform(value, name: str) -> int:
    """HunYuan allows per-layer lists; we serve one value for every layer."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config.json (hunyuan_v1_moe): per-layer {name} {value} is not supported "
                             "(must be one value for every layer)")
        value = value[0]
    return int(value)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(hf: dict, family: str, dim: int, max_pos: int) -> RopeConfig:
    """`rope_parameters` (v5) / `rope_scaling` (v4) -> RopeConfig; unsupported types are rejected by name."""
    rp = hf.get("rope_parameters") or hf.get("rope_scaling")
    if rp is None and family == "gpt_oss":   # GptOssConfig's default
        rp = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
              "original_max_position_embeddings": 4096}
    rp = rp or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    theta = float(rp.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA.get(family, 1e4))))
    if rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"config.json ({family}): partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return RopeConfig(theta=theta, dim=dim)
    if rope_type == "dynamic" and family == "hunyuan_v1_moe" and rp.get("alpha"):
        return RopeConfig(rope_type="ntk_alpha", theta=theta, dim=dim, alpha=float(rp["alpha"]))
    if rope_type == "yarn" and family in _YARN_FAMILIES:
        orig = hf.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings") or max_pos
        factor = rp.get("factor") or max_pos / orig
        attn = rp.get("attention_factor")
        if attn is None:
            m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
            attn = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)
        return RopeConfig(rope_type="yarn", theta=theta, dim=dim, factor=float(factor),
                          original_max_position_embeddings=int(orig), beta_fast=float(rp.get("beta_fast") or 32),
                          beta_slow=float(rp.get("beta_slow") or 1), truncate=bool(rp.get("truncate", True)),
                          attention_factor=float(attn))
    supported = ["default"] + (["yarn"] if family in _YARN_FAMILIES else []) + \
        (["dynamic with alpha"] if family == "hunyuan_v1_moe" else [])
    raise ValueError(f"config.json ({family}): unsupported rope_parameters/rope_scaling rope_type {rope_type!r} "
                     f"(supported: {', '.join(supported)})")


def _deepseek_v3(cls, hf: dict, common: dict, req) -> MoEConfig:
    heads, num_layers = common["num_heads"], common["num_layers"]
    nope, rope_dim, v_dim = req("qk_nope_head_dim"), req("qk_rope_head_dim"), req("v_head_dim")
    kv_lora, q_lora = req("kv_lora_rank"), hf.get("q_lora_rank", 1536)
    if rope_dim % 2:
        raise ValueError(f"config.json (deepseek_v3): qk_rope_head_dim {rope_dim} must be even")
    rope = _rope(hf, "deepseek_v3", rope_dim, common["max_position_embeddings"])
    scale = (nope + rope_dim) ** -0.5
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.rope_type != "default" and rp.get("mscale_all_dim"):
        scale *= _yarn_mscale(rope.factor, rp["mscale_all_dim"]) ** 2
    num_experts = req("n_routed_experts", "num_local_experts")
    top_k = req("num_experts_per_tok")
    n_group, topk_group = hf.get("n_group", 8) or 1, hf.get("topk_group", 4) or 1
    if num_experts % n_group or num_experts // n_group < 2 or not 1 <= topk_group <= n_group:
        raise ValueError(f"config.json (deepseek_v3): n_group {n_group} must divide n_routed_experts {num_experts} "
                         f"into groups of >= 2 and topk_group {topk_group} must be in [1, n_group]")
    if top_k > topk_group * (num_experts // n_group):
        raise ValueError(f"config.json (deepseek_v3): num_experts_per_tok {top_k} exceeds the experts of "
                         f"topk_group {topk_group} groups")
    norm = bool(hf.get("norm_topk_prob", True))
    first_dense = hf.get("first_k_dense_replace", 3) or 0
    moe_layers = tuple(i >= first_dense for i in range(num_layers))
    moe_inter = req("moe_intermediate_size")
    bias = bool(hf.get("attention_bias", False))
    rope = replace(rope, interleave=bool(hf.get("rope_interleave", True)))
    common = {**common, "num_kv_heads": heads, "head_dim": nope + rope_dim}
    return cls(**common, rope_theta=rope.theta, rope=rope, num_experts=num_experts, top_k=top_k,
               norm_topk_prob=norm, moe_intermediate_size=moe_inter, moe_layers=moe_layers,
               dense_intermediate_size=req("intermediate_size") if not all(moe_layers) else 0,
               shared_expert_intermediate_size=moe_inter * (hf.get("n_shared_experts", 1) or 0),
               shared_expert_gated=False, attention_bias=bias, o_proj_bias=bias,
               router=RouterConfig(top_k=top_k, scoring="sigmoid", norm_topk_prob=norm, n_group=n_group,
                                   topk_group=topk_group,
                                   routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
                                   score_correction_bias=True, fp32=True),
               mla=MLAConfig(q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope,
                             qk_rope_head_dim=rope_dim, v_head_dim=v_dim, softmax_scale=scale))


# yarn is parity-tested against transformers for these (mixtral / qwen2_moe keep rejecting it, as issue 2 did)
_YARN_FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss")

# transformers 5.24 defaults for fields config.json may leave out
_DEFAULT_THETA = {"mixtral": 1e6, "qwen2_moe": 1e4, "gpt_oss": 150000.0}   # others 1e4 (`default_theta`)
_DEFAULT_EPS = {"mixtral": 1e-5, "qwen2_moe": 1e-6, "qwen3_moe": 1e-6, "deepseek_v3": 1e-6, "hunyuan_v1_moe": 1e-5,
                "olmoe": 1e-5, "gpt_oss": 1e-5}
_DEFAULT_MAX_POS = {"mixtral": 4096 * 32, "qwen2_moe": 32768, "qwen3_moe": 32768, "deepseek_v3": 4096,
                    "hunyuan_v1_moe": 2048, "olmoe": 4096, "gpt_oss": 131072}
_DEFAULT_BOS = {"deepseek_v3": 0, "hunyuan_v1_moe": 1}
_DEFAULT_EOS = {"deepseek_v3": 1, "hunyuan_v1_moe": 2, "olmoe": 50279}
