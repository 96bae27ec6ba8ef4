"""Hugging Face safetensors checkpoints -> our weight dataclasses (HF tensor names live only here).

Shape legend: V vocab, D hidden, H query heads, Hkv KV heads, hd head_dim, E experts,
I intermediate (expert, shared expert or dense MLP).

The engine loads `DenseWeights` (everything but routed experts); expert shards call
`load_expert` for just the experts they hold. Tensors are read one at a time through
`safe_open`, so no file is ever read whole into memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from serving.model.config import MoEConfig
from serving.model.moe import ExpertWeights

MLPWeights = ExpertWeights   # a dense / shared-expert SwiGLU FFN has the same three matrices


class CheckpointReader:
    """Tensor-by-name access to `*.safetensors` in a directory, single file or sharded with an index."""

    def __init__(self, checkpoint_dir: str | Path):
        self.dir = Path(checkpoint_dir)
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
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} not found in checkpoint {self.dir}")
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor by name; with `index`, only row `index` of dim 0 is read (fused expert stacks)."""
        f = self._handle(name)
        return f.get_tensor(name) if index is None else f.get_slice(name)[index]


@dataclass(frozen=True, slots=True)
class LayerWeights:
    attn_norm: torch.Tensor              # [D]
    wq: torch.Tensor                     # [H*hd, D]
    wk: torch.Tensor                     # [Hkv*hd, D]
    wv: torch.Tensor                     # [Hkv*hd, D]
    wo: torch.Tensor                     # [D, H*hd]
    bq: torch.Tensor | None              # [H*hd]   (qwen2_moe)
    bk: torch.Tensor | None              # [Hkv*hd]
    bv: torch.Tensor | None              # [Hkv*hd]
    mlp_norm: torch.Tensor               # [D]
    router: torch.Tensor | None          # [E, D]   MoE layers
    shared_expert: MLPWeights | None     # qwen2_moe MoE layers
    shared_expert_gate: torch.Tensor | None  # [1, D]
    dense_mlp: MLPWeights | None         # dense (non-MoE) layers


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


def load_dense_weights(reader: CheckpointReader, config: MoEConfig, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> DenseWeights:
    """Everything except the routed experts, shape-checked against `config`."""
    c = config
    D, V, q_out, kv_out = c.hidden_size, c.vocab_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def get(name: str, *shape: int) -> torch.Tensor:
        return _load(reader, name, shape, dtype, device)

    def mlp(prefix: str, inter: int) -> MLPWeights:
        return MLPWeights(gate_ID=get(prefix + "gate_proj.weight", inter, D),
                          up_ID=get(prefix + "up_proj.weight", inter, D),
                          down_DI=get(prefix + "down_proj.weight", D, inter))

    layers = []
    for l, sparse in enumerate(c.moe_layers):
        p = f"model.layers.{l}."
        a = p + "self_attn."
        bias = c.attention_bias
        router = shared = shared_gate = dense = None
        if sparse:
            router = get(_first_present(reader, tuple(m + "gate.weight" for m in _moe_prefixes(c, l))), c.num_experts, D)
            if c.shared_expert_intermediate_size:
                shared = mlp(p + "mlp.shared_expert.", c.shared_expert_intermediate_size)
                shared_gate = get(p + "mlp.shared_expert_gate.weight", 1, D)
        else:
            dense = mlp(p + "mlp.", c.dense_intermediate_size)
        layers.append(LayerWeights(
            attn_norm=get(p + "input_layernorm.weight", D),
            wq=get(a + "q_proj.weight", q_out, D), wk=get(a + "k_proj.weight", kv_out, D),
            wv=get(a + "v_proj.weight", kv_out, D), wo=get(a + "o_proj.weight", D, q_out),
            bq=get(a + "q_proj.bias", q_out) if bias else None,
            bk=get(a + "k_proj.bias", kv_out) if bias else None,
            bv=get(a + "v_proj.bias", kv_out) if bias else None,
            mlp_norm=get(p + "post_attention_layernorm.weight", D),
            router=router, shared_expert=shared, shared_expert_gate=shared_gate, dense_mlp=dense))
    embed = get("model.embed_tokens.weight", V, D)
    lm_head = embed if c.tie_word_embeddings else get("lm_head.weight", V, D)
    return DenseWeights(embed=embed, layers=tuple(layers), final_norm=get("model.norm.weight", D), lm_head=lm_head)


def load_expert(reader: CheckpointReader, config: MoEConfig, layer: int, expert: int,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ExpertWeights:
    """One routed expert, from per-expert tensors or from the fused v5 stacks (reading only its slice)."""
    c = config
    if not c.moe_layers[layer] or not 0 <= expert < c.num_experts:
        raise ValueError(f"layer {layer} expert {expert}: not a routed expert of this {c.family} model")
    D, I = c.hidden_size, c.moe_intermediate_size
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


def load_all_experts(reader: CheckpointReader, config: MoEConfig, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> dict[int, dict[int, ExpertWeights]]:
    """Every routed expert of every MoE layer: {layer: {expert: weights}} (tests, single process)."""
    return {l: {e: load_expert(reader, config, l, e, dtype, device) for e in range(config.num_experts)}
            for l in config.moe_layer_ids}
