"""Hugging Face safetensors checkpoints -> our weight dataclasses (HF tensor names live only here).

Shape legend: V vocab, D hidden, H query heads, Hkv KV heads, hd head_dim, E experts,
I intermediate (expert, shared expert or dense MLP).

The engine loads `DenseWeights` (everything but routed experts); expert shards call
`load_expert` for just the experts they hold. Tensors are read one at a time through
`safe_open`, so no file is ever read whole into memory. FP8 and MXFP4 checkpoints' weights are
dequantized as they are read (serving/model/quantization.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from serving.model.config import MoEConfig
from serving.model.linear import Linear
from serving.model.moe import ExpertWeights
from serving.model.quantization import (MXFP4_BLOCKS, MXFP4_SCALES, SCALE_SUFFIX, TENSOR_SCALE_SUFFIX, FP8BlockQuant,
                                        FP8TensorQuant, dequantize_fp8, dequantize_fp8_rows, dequantize_mxfp4,
                                        quantization_from_hf)

MLPWeights = ExpertWeights   # a dense / shared-expert SwiGLU FFN has the same three matrices


class CheckpointReader:
    """Tensor-by-name access to `*.safetensors` in a directory, single file or sharded with an index.
    Quantized weights come out dequantized, in fp32: FP8 tensors with a `<name>_scale_inv` (block-wise)
    or `<name>_scale` (per tensor / row) beside them, and a `<name>` stored as MXFP4 `<name>_blocks` +
    `<name>_scales` (quantization.py)."""

    def __init__(self, checkpoint_dir: str | Path):
        self.dir = Path(checkpoint_dir)
        config = self.dir / "config.json"
        qc = json.loads(config.read_text()).get("quantization_config") if config.exists() else None
        self.quant = quantization_from_hf(qc) if qc else None
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.dir / fname for name, fname in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise ValueError(f"no *.safetensors files in {self.dir}")
            self._file_of = {}
            for path in files:
                with safe_open(path, framework="pt") as f:
                    self._file_of.update((name, path) for name in f.keys())
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of or self._mxfp4(name)

    def _mxfp4(self, name: str) -> bool:
        """`name` is stored as MXFP4 blocks and scales."""
        return (name not in self._file_of and name + MXFP4_BLOCKS in self._file_of
                and name + MXFP4_SCALES in self._file_of)

    def _handle(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} not found in checkpoint {self.dir}")
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        if self._mxfp4(name):          # blocks [..., R, G, 16] are the parameter [..., G * 32, R]
            *lead, R, G, half = self.shape(name + MXFP4_BLOCKS)
            return (*lead, G * half * 2, R)
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor by name; with `index`, only row `index` of dim 0 is read (fused expert stacks)."""
        if self._mxfp4(name):
            w = dequantize_mxfp4(self._raw(name + MXFP4_BLOCKS, index), self._raw(name + MXFP4_SCALES, index))
            return w.transpose(-1, -2)
        t = self._raw(name, index)
        if t.dtype not in _FP8_DTYPES:
            return t
        suffix = {FP8BlockQuant: SCALE_SUFFIX, FP8TensorQuant: TENSOR_SCALE_SUFFIX}.get(type(self.quant))
        if suffix is None or name + suffix not in self:
            missing = ("config.json has no quantization_config" if self.quant is None else
                       "config.json's quantization_config is not fp8" if suffix is None else
                       f"no tensor {name + suffix!r}")
            raise ValueError(f"tensor {name!r} is {t.dtype} but {missing}: cannot dequantize it")
        scale = self._raw(name + suffix, index)
        if isinstance(self.quant, FP8BlockQuant):
            return dequantize_fp8(t, scale, self.quant)
        return dequantize_fp8_rows(t, scale)

    def _raw(self, name: str, index: int | None) -> torch.Tensor:
        f = self._handle(name)
        return f.get_tensor(name) if index is None else f.get_slice(name)[index]


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True, kw_only=True, slots=True)
class MLAWeights:
    """DeepSeek MLA projections (R kv_lora_rank, Rq q_lora_rank, X = H * (dn + dr), Y = H * (dn + dv))."""
    wq: torch.Tensor | None              # [X, D]   q_lora_rank None
    wq_a: torch.Tensor | None            # [Rq, D]
    bq_a: torch.Tensor | None            # [Rq]     attention_bias
    q_a_norm: torch.Tensor | None        # [Rq]
    wq_b: torch.Tensor | None            # [X, Rq]
    wkv_a: torch.Tensor                  # [R + dr, D]  kv_a_proj_with_mqa
    bkv_a: torch.Tensor | None           # [R + dr]
    kv_a_norm: torch.Tensor              # [R]
    wkv_b: torch.Tensor                  # [Y, R]


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerWeights:
    attn_norm: torch.Tensor              # [D]
    mlp_norm: torch.Tensor               # [D]
    wo: torch.Tensor                     # [D, H*hd] (MLA: [D, H*dv])
    bo: torch.Tensor | None = None       # [D]
    wq: torch.Tensor | None = None       # [H*hd, D]   GQA attention ...
    wk: torch.Tensor | None = None       # [Hkv*hd, D]
    wv: torch.Tensor | None = None       # [Hkv*hd, D]
    bq: torch.Tensor | None = None       # [H*hd]
    bk: torch.Tensor | None = None       # [Hkv*hd]
    bv: torch.Tensor | None = None       # [Hkv*hd]
    q_norm: torch.Tensor | None = None   # [hd] per head, or [H*hd] (olmoe)
    k_norm: torch.Tensor | None = None   # [hd] per head, or [Hkv*hd] (olmoe)
    sinks: torch.Tensor | None = None    # [H]  gpt_oss
    mla: MLAWeights | None = None        # ... or DeepSeek MLA
    router: torch.Tensor | None = None   # [E, D]   MoE layers
    router_bias: torch.Tensor | None = None        # [E]  gpt_oss
    router_score_bias: torch.Tensor | None = None  # [E]  deepseek_v3 e_score_correction_bias
    shared_expert: MLPWeights | None = None        # qwen2_moe / deepseek_v3 / hunyuan MoE layers
    shared_expert_gate: torch.Tensor | None = None  # [1, D]  qwen2_moe
    dense_mlp: MLPWeights | None = None  # dense (non-MoE) layers
    # derived once (GQA): q, k, v as one GEMM [H*hd + 2*Hkv*hd, D], and o, prepacked where the CPU allows
    qkv: Linear | None = field(init=False, repr=False, compare=False)
    o: Linear = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        qkv = None
        if self.wq is not None:     # q, k, v become views of the fused weight: the loaded copies go
            qkv, views = Linear.fused((self.wq, self.wk, self.wv), (self.bq, self.bk, self.bv))
            for name, view in zip(("wq", "wk", "wv"), views):
                object.__setattr__(self, name, view)
        object.__setattr__(self, "qkv", qkv)
        object.__setattr__(self, "o", Linear(self.wo, self.bo))


@dataclass(frozen=True, slots=True)
class DenseWeights:
    embed: torch.Tensor                  # [V, D]
    layers: tuple[LayerWeights, ...]
    final_norm: torch.Tensor             # [D]
    lm_head: torch.Tensor                # [V, D] (the embedding itself when tied)


def _moe_prefixes(config: MoEConfig, layer: int) -> tuple[str, ...]:
    # Mixtral's original name is `block_sparse_moe`; transformers v5 state dicts call it `mlp`.
    p = f"model.layers.{layer}."
    return (p + "block_sparse_moe.", p + "mlp.") if config.family == "mixtral" else (p + "mlp.",)


def _first_present(reader: CheckpointReader, candidates: tuple[str, ...]) -> str:
    for name in candidates:
        if name in reader:
            return name
    raise KeyError(f"tensor {candidates[0]!r} not found in checkpoint {reader.dir}")


def _load(reader: CheckpointReader, name: str, shape: tuple[int, ...], dtype: torch.dtype, device,
          index: int | None = None) -> torch.Tensor:
    t = reader.get(name, index)
    if tuple(t.shape) != shape:
        where = name if index is None else f"{name}[{index}]"
        raise ValueError(f"tensor {where!r}: checkpoint shape {tuple(t.shape)} != expected {shape}")
    return t.to(device=device, dtype=dtype)


_ROUTER_NAME = {"hunyuan_v1_moe": "gate.wg.weight", "gpt_oss": "router.weight"}
_SHARED_NAME = {"qwen2_moe": "shared_expert.", "deepseek_v3": "shared_experts.", "hunyuan_v1_moe": "shared_mlp."}
_QK_NORM_NAMES = {"hunyuan_v1_moe": ("query_layernorm", "key_layernorm")}


def load_dense_weights(reader: CheckpointReader, config: MoEConfig, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> DenseWeights:
    """Everything except the routed experts, shape-checked against `config`.

    Kept in fp32 whatever `dtype` is, as transformers keeps them: the deepseek_v3 / hunyuan router
    (and e_score_correction_bias) and gpt_oss's RMSNorm weights.
    """
    c = config
    D, V, H, hd = c.hidden_size, c.vocab_size, c.num_heads, c.head_dim
    q_out, kv_out = H * hd, c.num_kv_heads * hd
    norm_dtype = torch.float32 if c.family == "gpt_oss" else dtype

    def get(name: str, *shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return _load(reader, name, shape, dt, device)

    def mlp(prefix: str, inter: int) -> MLPWeights:
        return MLPWeights(gate_ID=get(prefix + "gate_proj.weight", inter, D),
                          up_ID=get(prefix + "up_proj.weight", inter, D),
                          down_DI=get(prefix + "down_proj.weight", D, inter))

    layers = []
    for l, sparse in enumerate(c.moe_layers):
        p = f"model.layers.{l}."
        a = p + "self_attn."
        ffn: dict = {}
        if sparse:
            router_dtype = torch.float32 if c.router.fp32 else dtype
            if c.family in _ROUTER_NAME:
                ffn["router"] = get(p + "mlp." + _ROUTER_NAME[c.family], c.num_experts, D, dt=router_dtype)
            else:
                ffn["router"] = get(_first_present(reader, tuple(m + "gate.weight" for m in _moe_prefixes(c, l))),
                                    c.num_experts, D, dt=router_dtype)
            if c.router.bias:
                ffn["router_bias"] = get(p + "mlp.router.bias", c.num_experts)
            if c.router.score_correction_bias:
                ffn["router_score_bias"] = get(p + "mlp.gate.e_score_correction_bias", c.num_experts,
                                               dt=torch.float32)
            if c.shared_expert_intermediate_size:
                ffn["shared_expert"] = mlp(p + "mlp." + _SHARED_NAME[c.family], c.shared_expert_intermediate_size)
                if c.shared_expert_gated:
                    ffn["shared_expert_gate"] = get(p + "mlp.shared_expert_gate.weight", 1, D)
        else:
            ffn["dense_mlp"] = mlp(p + "mlp.", c.dense_intermediate_size)
        attn: dict = {}
        if c.mla is not None:
            m = c.mla
            X, R, dr = H * m.qk_head_dim, m.kv_lora_rank, m.qk_rope_head_dim
            b = c.attention_bias
            lora = m.q_lora_rank
            attn["mla"] = MLAWeights(
                wq=get(a + "q_proj.weight", X, D) if lora is None else None,
                wq_a=get(a + "q_a_proj.weight", lora, D) if lora else None,
                bq_a=get(a + "q_a_proj.bias", lora) if lora and b else None,
                q_a_norm=get(a + "q_a_layernorm.weight", lora) if lora else None,
                wq_b=get(a + "q_b_proj.weight", X, lora) if lora else None,
                wkv_a=get(a + "kv_a_proj_with_mqa.weight", R + dr, D),
                bkv_a=get(a + "kv_a_proj_with_mqa.bias", R + dr) if b else None,
                kv_a_norm=get(a + "kv_a_layernorm.weight", R),
                wkv_b=get(a + "kv_b_proj.weight", H * (m.qk_nope_head_dim + m.v_head_dim), R))
            o_in = H * m.v_head_dim
        else:
            o_in = q_out
            attn.update(wq=get(a + "q_proj.weight", q_out, D), wk=get(a + "k_proj.weight", kv_out, D),
                        wv=get(a + "v_proj.weight", kv_out, D))
            if c.attention_bias:
                attn.update(bq=get(a + "q_proj.bias", q_out), bk=get(a + "k_proj.bias", kv_out),
                            bv=get(a + "v_proj.bias", kv_out))
            if c.qk_norm is not None:
                qn, kn = _QK_NORM_NAMES.get(c.family, ("q_norm", "k_norm"))
                full = c.qk_norm == "full"   # olmoe: k_norm spans (D // H) * Hkv
                attn.update(q_norm=get(a + qn + ".weight", q_out if full else hd),
                            k_norm=get(a + kn + ".weight", (D // H) * c.num_kv_heads if full else hd))
            if c.attention_sinks:
                attn["sinks"] = get(a + "sinks", H, dt=torch.float32)
        layers.append(LayerWeights(
            attn_norm=get(p + "input_layernorm.weight", D, dt=norm_dtype),
            mlp_norm=get(p + "post_attention_layernorm.weight", D, dt=norm_dtype),
            wo=get(a + "o_proj.weight", D, o_in), bo=get(a + "o_proj.bias", D) if c.o_proj_bias else None,
            **attn, **ffn))
    embed = get("model.embed_tokens.weight", V, D)
    lm_head = embed if c.tie_word_embeddings else get("lm_head.weight", V, D)
    return DenseWeights(embed=embed, layers=tuple(layers), final_norm=get("model.norm.weight", D, dt=norm_dtype),
                        lm_head=lm_head)


def load_expert(reader: CheckpointReader, config: MoEConfig, layer: int, expert: int,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ExpertWeights:
    """One routed expert, from per-expert tensors or from fused stacks (reading only its slice)."""
    c = config
    if not c.moe_layers[layer] or not 0 <= expert < c.num_experts:
        raise ValueError(f"layer {layer} expert {expert}: not a routed expert of this {c.family} model")
    D, I = c.hidden_size, c.moe_intermediate_size
    if c.family == "gpt_oss":
        return _load_gpt_oss_expert(reader, c, layer, expert, dtype, device)
    legacy = ("w1", "w3", "w2") if c.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for m in _moe_prefixes(c, layer):
        e = f"{m}experts.{expert}."
        if e + legacy[0] + ".weight" in reader:
            return ExpertWeights(gate_ID=_load(reader, e + legacy[0] + ".weight", (I, D), dtype, device),
                                 up_ID=_load(reader, e + legacy[1] + ".weight", (I, D), dtype, device),
                                 down_DI=_load(reader, e + legacy[2] + ".weight", (D, I), dtype, device))
        fused = m + "experts.gate_up_proj"
        if fused in reader:
            # transformers v5 `gate_up_proj` [E, 2I, D] (gate rows first) and `down_proj` [E, D, I]
            gate_up = reader.get(fused, expert)
            down = reader.get(m + "experts.down_proj", expert)
            if gate_up.shape == (D, 2 * I) and D != 2 * I:   # some exporters store [E, D, 2I] / [E, I, D]
                gate_up, down = gate_up.T, down.T
            if tuple(gate_up.shape) != (2 * I, D) or tuple(down.shape) != (D, I):
                raise ValueError(f"tensor {fused!r}[{expert}]: checkpoint shapes {tuple(gate_up.shape)}, "
                                 f"{tuple(down.shape)} != expected {(2 * I, D)}, {(D, I)}")
            gate_up, down = gate_up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype)
            return ExpertWeights(gate_ID=gate_up[:I].contiguous(), up_ID=gate_up[I:].contiguous(),
                                 down_DI=down.contiguous())
    raise KeyError(f"tensor {_moe_prefixes(c, layer)[0]}experts.{expert}.{legacy[0]}.weight "
                   f"(or fused experts.gate_up_proj) not found in checkpoint {reader.dir}")


def _load_gpt_oss_expert(reader: CheckpointReader, c: MoEConfig, layer: int, expert: int, dtype: torch.dtype,
                         device) -> ExpertWeights:
    """gpt_oss stores experts fused (save_pretrained keeps them so): `gate_up_proj` [E, D, 2I] applied as x @ W with
    gate/up interleaved in the last dim (even = gate, odd = up), `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, D],
    `down_proj_bias` [E, D]. Only row `expert` of each is read."""
    D, I = c.hidden_size, c.moe_intermediate_size
    m = f"model.layers.{layer}.mlp.experts."
    gate_up_DX = _load(reader, m + "gate_up_proj", (D, 2 * I), dtype, device, expert)
    gate_up_bias_X = _load(reader, m + "gate_up_proj_bias", (2 * I,), dtype, device, expert)
    down_ID = _load(reader, m + "down_proj", (I, D), dtype, device, expert)
    down_bias_D = _load(reader, m + "down_proj_bias", (D,), dtype, device, expert)
    return ExpertWeights(gate_ID=gate_up_DX[:, 0::2].T.contiguous(), up_ID=gate_up_DX[:, 1::2].T.contiguous(),
                         down_DI=down_ID.T.contiguous(), gate_bias_I=gate_up_bias_X[0::2].contiguous(),
                         up_bias_I=gate_up_bias_X[1::2].contiguous(), down_bias_D=down_bias_D.contiguous(),
                         swiglu_limit=c.swiglu_limit, swiglu_alpha=c.swiglu_alpha)


def load_all_experts(reader: CheckpointReader, config: MoEConfig, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> dict[int, dict[int, ExpertWeights]]:
    """Every routed expert of every MoE layer: {layer: {expert: weights}} (tests, single process)."""
    return {l: {e: load_expert(reader, config, l, e, dtype, device) for e in range(config.num_experts)}
            for l in config.moe_layer_ids}
