"""Dense building blocks: RMSNorm, rotary embedding, batched attention over the KV cache, SwiGLU MLP.

Op order follows transformers' Mixtral / Qwen2-MoE so fp32 logits match to ~1e-6.
Shape legend: T new tokens (all sequences concatenated), B sequences, Q longest new-token run,
C context (longest sequence incl. new tokens), D hidden, H query heads, Hkv KV heads, hd head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serving.model.kv_cache import KVCache
from serving.model.moe import ExpertWeights


def rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back, then scale (HF order)."""
    x = x_TD.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight_D * x.to(x_TD.dtype)


def swiglu(x_TD: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)): dense MLP layers and the shared expert."""
    return F.linear(F.silu(F.linear(x_TD, w.gate_ID)) * F.linear(x_TD, w.up_ID), w.down_DI)


class RotaryEmbedding:
    """Default (unscaled) RoPE with HF's rotate_half layout."""

    def __init__(self, head_dim: int, theta: float, device: str | torch.device = "cpu"):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))

    def cos_sin(self, pos_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_Th = pos_T[:, None].float() * self.inv_freq
        emb_Thd = torch.cat((freqs_Th, freqs_Th), dim=-1)
        return emb_Thd.cos().to(dtype), emb_Thd.sin().to(dtype)


def apply_rope(x_THd: torch.Tensor, cos_Thd: torch.Tensor, sin_Thd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_THd.chunk(2, dim=-1)
    return x_THd * cos_Thd[:, None] + torch.cat((-x2, x1), dim=-1) * sin_Thd[:, None]


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Index tensors for one engine step, shared by every layer."""
    slots_T: torch.Tensor       # KV slot of each new token
    pos_T: torch.Tensor         # its position in its sequence
    slots_B: torch.Tensor
    pad_index_BQ: torch.Tensor  # token index feeding each padded query row (0 for padding)
    unpad_index_T: torch.Tensor  # row of the flattened [B*Q] padded layout holding each token
    mask_B1QC: torch.Tensor     # True = may attend (causal, per-sequence length, sliding window)
    ctx_len: int                # C

    @classmethod
    def build(cls, slots: tuple[int, ...], start_pos: tuple[int, ...], q_lens: tuple[int, ...],
              sliding_window: int | None, device: str | torch.device = "cpu") -> "AttentionMetadata":
        B, Q = len(q_lens), max(q_lens)
        C = max(s + q for s, q in zip(start_pos, q_lens))
        q_lens_B = torch.tensor(q_lens, device=device)
        start_B = torch.tensor(start_pos, device=device)
        slots_B = torch.tensor(slots, device=device)
        seq_T = torch.repeat_interleave(torch.arange(B, device=device), q_lens_B)
        first_T = torch.cumsum(q_lens_B, 0)[seq_T] - q_lens_B[seq_T]
        offset_T = torch.arange(len(seq_T), device=device) - first_T   # index within its sequence's new tokens
        ar_Q = torch.arange(Q, device=device)
        valid_BQ = ar_Q[None] < q_lens_B[:, None]
        pad_index_BQ = torch.where(valid_BQ, (torch.cumsum(q_lens_B, 0) - q_lens_B)[:, None] + ar_Q[None], 0)
        qpos_BQ = start_B[:, None] + ar_Q[None]
        kpos_C = torch.arange(C, device=device)
        mask_BQC = kpos_C[None, None] <= qpos_BQ[:, :, None]
        if sliding_window:
            mask_BQC &= kpos_C[None, None] > qpos_BQ[:, :, None] - sliding_window
        return cls(slots_T=slots_B[seq_T], pos_T=start_B[seq_T] + offset_T, slots_B=slots_B,
                   pad_index_BQ=pad_index_BQ, unpad_index_T=seq_T * Q + offset_T,
                   mask_B1QC=mask_BQC[:, None], ctx_len=C)


def attention(x_TD: torch.Tensor, lw, layer: int, cos_Thd: torch.Tensor, sin_Thd: torch.Tensor,
              meta: AttentionMetadata, kv: KVCache, head_dim: int) -> torch.Tensor:
    """GQA self-attention for a mixed prefill/decode batch: write new K/V, one SDPA over padded queries."""
    T = x_TD.shape[0]
    q_THd = F.linear(x_TD, lw.wq, lw.bq).view(T, -1, head_dim)
    k_THd = F.linear(x_TD, lw.wk, lw.bk).view(T, -1, head_dim)
    v_THd = F.linear(x_TD, lw.wv, lw.bv).view(T, -1, head_dim)
    q_THd, k_THd = apply_rope(q_THd, cos_Thd, sin_Thd), apply_rope(k_THd, cos_Thd, sin_Thd)
    kv.write(layer, meta.slots_T, meta.pos_T, k_THd, v_THd)
    k_BHCd, v_BHCd = kv.read(layer, meta.slots_B, meta.ctx_len)
    q_BHQd = q_THd[meta.pad_index_BQ].transpose(1, 2)
    o_BHQd = F.scaled_dot_product_attention(q_BHQd, k_BHCd, v_BHCd, attn_mask=meta.mask_B1QC,
                                            scale=head_dim ** -0.5, enable_gqa=True)
    o_TD = o_BHQd.transpose(1, 2).flatten(0, 1)[meta.unpad_index_T].flatten(1)
    return F.linear(o_TD, lw.wo)
