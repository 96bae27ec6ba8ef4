"""Preallocated per-slot KV cache. The engine owns slot assignment; a slot holds one sequence.

Shape legend: S slots, Hkv KV heads, L max_seq_len, hd head_dim, T new tokens, B sequences, C context.
"""
from __future__ import annotations

import torch

from serving.model.config import MoEConfig


class KVCache:
    """k[layer], v[layer]: [S, Hkv, L, hd], zero-initialised (masked reads must never see NaN)."""

    def __init__(self, config: MoEConfig, num_slots: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        shape = (num_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slots_T: torch.Tensor, pos_T: torch.Tensor,
              k_THd: torch.Tensor, v_THd: torch.Tensor) -> None:
        """Store the new tokens' K/V ([T, Hkv, hd]) at (slot, position)."""
        self.k[layer][slots_T, :, pos_T] = k_THd
        self.v[layer][slots_T, :, pos_T] = v_THd

    def read(self, layer: int, slots_B: torch.Tensor, ctx_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the first `ctx_len` positions of each slot: [B, Hkv, C, hd]."""
        return (self.k[layer][:, :, :ctx_len].index_select(0, slots_B),
                self.v[layer][:, :, :ctx_len].index_select(0, slots_B))
