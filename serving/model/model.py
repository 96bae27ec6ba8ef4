"""The MoE decoder (every SUPPORTED_FAMILIES member): dense math here, routed experts behind an injected dispatch.

Shape legend: T new tokens of the step (all sequences concatenated), B sequences, D hidden,
V vocab, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generator

import torch
import torch.nn.functional as F

from serving.model.config import MoEConfig
from serving.model.kv_cache import KVCache
from serving.model.linear import Linear, WarmTarget
from serving.model.layers import AttentionMetadata, RotaryEmbedding, attention, mla_attention, rms_norm, swiglu
from serving.model.moe import ExpertDispatch, route
from serving.model.weights import CheckpointReader, DenseWeights, load_dense_weights

__all__ = ["BatchLayout", "ExpertCall", "ExpertDispatch", "MoEModel"]


@dataclass(frozen=True, slots=True)
class ExpertCall:
    """What one MoE layer asks of the routed experts: y_TD for these tokens."""
    layer: int
    h_TD: torch.Tensor             # normed hidden states
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """One engine step: B sequences, their new tokens concatenated into T (prefill and decode mixed)."""
    slots: tuple[int, ...]        # batch slot of each sequence          (len B)
    start_pos: tuple[int, ...]    # tokens already in the cache for it  (len B) = position of its first new token
    q_lens: tuple[int, ...]       # new tokens of each sequence in this step (len B), sum = T
    # KV-cache blocks of each sequence (the engine's paged tables); None: the cache's static per-slot layout
    block_tables: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def single(cls, slot: int, start_pos: int, q_len: int) -> "BatchLayout":
        return cls((slot,), (start_pos,), (q_len,))


class MoEModel:
    def __init__(self, config: MoEConfig, weights: DenseWeights):
        self.config, self.weights = config, weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.rope = RotaryEmbedding.from_config(config, self.device)
        # [V, D], prepacked on CPU (fp32; bf16 where oneDNN has it); `lm_head` may be wrapped (its threads)
        self.lm_head = self.lm_head_linear = Linear(weights.lm_head)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "MoEModel":
        """Config + dense weights only; routed experts are loaded by whoever serves them."""
        config = MoEConfig.from_dir(checkpoint_dir)
        return cls(config, load_dense_weights(CheckpointReader(checkpoint_dir), config, dtype, device))

    def warm_targets(self, max_tokens: int, max_seqs: int) -> list[WarmTarget]:
        """The dense part's linears and the most rows each sees in a step of `max_tokens` new tokens
        over `max_seqs` sequences (the lm_head: one row per sequence), for `linear.warm_up`."""
        out = []
        for lw in self.weights.layers:
            ffns = [f for f in (lw.dense_mlp, lw.shared_expert) if f is not None]
            for lin in (lw.qkv, lw.o, *(x for f in ffns for x in (f.gate_up, f.down))):
                if lin is not None:
                    out.append(WarmTarget(lin, lin, max_tokens))
        out.append(WarmTarget(self.lm_head, self.lm_head_linear, max_seqs))
        return out

    @torch.inference_mode()
    def forward(self, input_ids_T: torch.Tensor, batch: BatchLayout, kv: KVCache, dispatch: ExpertDispatch,
                all_logits: bool = False, rows_R: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32) of the last new token of each sequence [B, V], of every new token [T, V]
        (all_logits), or of the new tokens at indices rows_R [R, V]."""
        steps = self.forward_steps(input_ids_T, batch, kv, all_logits, rows_R)
        try:
            call = next(steps)
            while True:
                call = steps.send(dispatch(call.layer, call.h_TD, call.topk_ids_TK, call.topk_weights_TK))
        except StopIteration as done:
            return done.value

    @torch.inference_mode()
    def forward_steps(self, input_ids_T: torch.Tensor, batch: BatchLayout, kv: KVCache,
                      all_logits: bool = False, rows_R: torch.Tensor | None = None
                      ) -> Generator[ExpertCall, torch.Tensor, torch.Tensor]:
        """`forward`, paused at every MoE layer: it yields an ExpertCall, is sent the routed
        experts' output y_TD, and returns the logits. Whoever drives it decides how the experts
        are reached and what runs meanwhile (serving/engine/micro_batch.py overlaps two)."""
        c, w = self.config, self.weights
        if sum(batch.q_lens) != input_ids_T.numel() or min(batch.q_lens) < 1:
            raise ValueError(f"BatchLayout q_lens {batch.q_lens} do not cover {input_ids_T.numel()} tokens")
        # per-layer sliding windows (gpt_oss) get their own mask; a model-wide window is baked into the base mask
        tables = batch.block_tables or tuple(kv.static_table(s) for s in batch.slots)
        ctx_len = max(s + q for s, q in zip(batch.start_pos, batch.q_lens))
        if ctx_len > kv.max_seq_len:
            raise ValueError(f"sequence length {ctx_len} exceeds KV cache max_seq_len {kv.max_seq_len}")
        base = AttentionMetadata.build(tables, batch.start_pos, batch.q_lens,
                                       None if c.layer_windows else c.sliding_window, kv.block_size, self.device)
        metas = {win: base.with_window(win) for win in set(c.layer_windows)}
        attend = mla_attention if c.mla is not None else attention
        x_TD = F.embedding(input_ids_T.to(self.device), w.embed)
        cos, sin = self.rope.cos_sin(base.pos_T, self.dtype)
        for l, lw in enumerate(w.layers):
            meta = metas[c.layer_windows[l]] if c.layer_windows else base
            x_TD = x_TD + attend(rms_norm(x_TD, lw.attn_norm, c.rms_norm_eps), lw, l, cos, sin, meta, kv, c)
            h_TD = rms_norm(x_TD, lw.mlp_norm, c.rms_norm_eps)
            if lw.router is None:
                x_TD = x_TD + swiglu(h_TD, lw.dense_mlp)
                continue
            router_in_TD = h_TD.float() if lw.router.dtype == torch.float32 else h_TD
            router_logits_TE = F.linear(router_in_TD, lw.router, lw.router_bias)
            topk_weights_TK, topk_ids_TK = route(router_logits_TE, c.router, lw.router_score_bias)  # [T, K]
            y_TD = yield ExpertCall(l, h_TD, topk_ids_TK, topk_weights_TK)
            if lw.shared_expert is not None:
                shared_TD = swiglu(h_TD, lw.shared_expert)
                if lw.shared_expert_gate is not None:
                    shared_TD = torch.sigmoid(F.linear(h_TD, lw.shared_expert_gate)) * shared_TD
                y_TD = y_TD + shared_TD
            x_TD = x_TD + y_TD
        if rows_R is not None:
            x_TD = x_TD[rows_R.to(self.device)]                                              # [R, D]
        elif not all_logits:
            x_TD = x_TD[torch.cumsum(torch.tensor(batch.q_lens, device=self.device), 0) - 1]   # [B, D]
        return self.lm_head(rms_norm(x_TD, w.final_norm, c.rms_norm_eps)).float()
