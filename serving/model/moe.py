"""Router and routed-expert math (SwiGLU experts), written for batches.

Shape legend: T tokens, D hidden, E experts, K top-k, I expert intermediate,
N = T*K (token, slot) pairs, n the pairs routed to one expert.
The model calls `route` locally; the routed experts run wherever the dispatcher
(serving/parallel/) puts them, via `experts_forward`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

# dispatch(layer_idx, x_TD, topk_ids_TK, topk_weights_TK) -> y_TD (routed-expert output only)
ExpertDispatch = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class ExpertWeights:
    """One routed expert's SwiGLU FFN: down(silu(gate(x)) * up(x))."""
    gate_ID: torch.Tensor   # HF w1 / gate_proj  [I, D]
    up_ID: torch.Tensor     # HF w3 / up_proj    [I, D]
    down_DI: torch.Tensor   # HF w2 / down_proj  [D, I]


def route(router_logits_TE: torch.Tensor, top_k: int, norm_topk_prob: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing. Returns (topk_weights_TK fp32, topk_ids_TK int64)."""
    probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
    topk_weights_TK, topk_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if norm_topk_prob:
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
    return topk_weights_TK, topk_ids_TK


def experts_forward(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                    experts: Mapping[int, ExpertWeights]) -> torch.Tensor:
    """sum_k w[t,k] * expert[ids[t,k]](x[t]) over the (t,k) whose expert is in `experts`.

    Slots routed to experts absent from `experts` contribute zero, so S shards that
    each hold a disjoint subset of experts return partial sums that add up to the
    full MoE output. Tokens are grouped by expert: one GEMM per expert, no per-token loop.
    Accumulates in fp32; returns y_TD in x_TD's dtype.
    """
    T, K = topk_ids_TK.shape
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    if T == 0 or not experts:
        return y_TD.to(x_TD.dtype)
    # 1. sort the T*K (token, slot) pairs by expert id, so each expert's tokens are one contiguous run
    ids_N = topk_ids_TK.reshape(-1)
    order_N = torch.argsort(ids_N, stable=True)
    counts = torch.bincount(ids_N, minlength=max(experts) + 1).tolist()
    weights_N = topk_weights_TK.reshape(-1).float()
    start = 0
    for e, n in enumerate(counts):
        # 2. one SwiGLU GEMM chain per expert held here over its tokens, 3. weighted scatter-add back
        if n and e in experts:
            w = experts[e]
            pairs_n = order_N[start:start + n]
            tok_n = pairs_n // K
            x_nD = x_TD.index_select(0, tok_n)
            h_nI = F.silu(F.linear(x_nD, w.gate_ID)) * F.linear(x_nD, w.up_ID)
            out_nD = F.linear(h_nI, w.down_DI)
            y_TD.index_add_(0, tok_n, out_nD.float() * weights_N[pairs_n, None])
        start += n
    return y_TD.to(x_TD.dtype)


def local_dispatch(experts_by_layer: Mapping[int, Mapping[int, ExpertWeights]]) -> ExpertDispatch:
    """The in-process reference transport: every expert of every layer lives here."""
    def dispatch(layer_idx: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                 topk_weights_TK: torch.Tensor) -> torch.Tensor:
        return experts_forward(x_TD, topk_ids_TK, topk_weights_TK, experts_by_layer[layer_idx])
    return dispatch
