"""Preallocated per-slot KV cache. The engine owns slot assignment; a slot holds one sequence.

Shape legend: S slots, Hkv KV heads, L max_seq_len, hd head_dim, T new tokens, B sequences, C context,
R MLA kv_lora_rank, dr MLA qk_rope_head_dim.

The layout follows the config: GQA families cache full K/V per KV head; DeepSeek MLA caches only
the compressed latent (R, already RMS-normed) and the rope'd shared k_pe (dr) per token, one
"head" each, which is (R + dr) / (H * (qk_head_dim + v_head_dim)) of the full K/V.
"""
from __future__ import annotations

import torch

from serving.model.config import MoEConfig


class KVCache:
    """k[layer], v[layer]: [S, Hkv, L, hd] (GQA) or latent/k_pe [S, 1, L, R] / [S, 1, L, dr] (MLA, aliased
    as k/v so write/read are shared), zero-initialised (masked reads must never see NaN)."""

    def __init__(self, config: MoEConfig, num_slots: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        if config.mla is not None:
            self.layout = "mla"
            k_shape = (num_slots, 1, max_seq_len, config.mla.kv_lora_rank)
            v_shape = (num_slots, 1, max_seq_len, config.mla.qk_rope_head_dim)
        else:
            self.layout = "gqa"
            k_shape = v_shape = (num_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(k_shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @property
    def latent(self) -> list[torch.Tensor]:
        """MLA: the per-layer normed latent caches [S, 1, L, R]."""
        assert self.layout == "mla"
        return self.k

    @property
    def k_pe(self) -> list[torch.Tensor]:
        """MLA: the per-layer rope'd k_pe caches [S, 1, L, dr]."""
        assert self.layout == "mla"
        return self.v

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slots_T: torch.Tensor, pos_T: torch.Tensor,
              k_THd: torch.Tensor, v_THd: torch.Tensor) -> None:
        """Store the new tokens' K/V ([T, Hkv, hd]; MLA: latent [T, 1, R], k_pe [T, 1, dr]) at (slot, position)."""
        self.k[layer][slots_T, :, pos_T] = k_THd
        self.v[layer][slots_T, :, pos_T] = v_THd

    def read(self, layer: int, slots_B: torch.Tensor, ctx_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the first `ctx_len` positions of each slot: [B, Hkv, C, hd] (MLA: [B, 1, C, R], [B, 1, C, dr])."""
        return (self.k[layer][:, :, :ctx_len].index_select(0, slots_B),
                self.v[layer][:, :, :ctx_len].index_select(0, slots_B))
