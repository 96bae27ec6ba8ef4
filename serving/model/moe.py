"""Router and routed-expert math (SwiGLU experts), written for batches.

Shape legend: T tokens, D hidden, E experts, K top-k, I expert intermediate, G router groups,
N = T*K (token, slot) pairs, n the pairs routed to one expert.
The model calls `route` locally; the routed experts run wherever the dispatcher
(serving/parallel/) puts them, via `experts_forward`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from serving.model.config import RouterConfig
from serving.model.linear import Linear

# dispatch(layer_idx, x_TD, topk_ids_TK, topk_weights_TK) -> y_TD (routed-expert output only)
ExpertDispatch = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class ExpertWeights:
    """One routed expert's FFN: down(act(gate(x), up(x))).

    act is silu(g) * u, or with `swiglu_limit` set gpt_oss's clamped SwiGLU
    (g <- min(g, limit), u <- clamp(u, -limit, limit), (u + 1) * g * sigmoid(alpha * g)).
    Biases (gpt_oss) belong to the expert, so they only reach tokens routed to it.
    """
    gate_ID: torch.Tensor   # HF w1 / gate_proj  [I, D]
    up_ID: torch.Tensor     # HF w3 / up_proj    [I, D]
    down_DI: torch.Tensor   # HF w2 / down_proj  [D, I]
    gate_bias_I: torch.Tensor | None = None
    up_bias_I: torch.Tensor | None = None
    down_bias_D: torch.Tensor | None = None
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # derived once: gate and up as one GEMM [2I, D], and down, both prepacked where the CPU allows
    gate_up: Linear = field(init=False, repr=False, compare=False)
    down: Linear = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        gate_up, (gate_ID, up_ID) = Linear.fused((self.gate_ID, self.up_ID), (self.gate_bias_I, self.up_bias_I))
        object.__setattr__(self, "gate_ID", gate_ID)      # views of the fused weight: the loaded copies go
        object.__setattr__(self, "up_ID", up_ID)
        object.__setattr__(self, "gate_up", gate_up)
        object.__setattr__(self, "down", Linear(self.down_DI, self.down_bias_D))

    def __call__(self, x_nD: torch.Tensor) -> torch.Tensor:
        g_nI, u_nI = self.gate_up(x_nD).chunk(2, dim=-1)
        if self.swiglu_limit is None:
            h_nI = F.silu(g_nI) * u_nI
        else:
            g_nI = g_nI.clamp(max=self.swiglu_limit)
            u_nI = u_nI.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
            h_nI = (u_nI + 1) * (g_nI * torch.sigmoid(g_nI * self.swiglu_alpha))
        return self.down(h_nI)


def route(router_logits_TE: torch.Tensor, router: RouterConfig, score_bias_E: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits -> (topk_weights_TK fp32, topk_ids_TK int64), as `router.scoring` says:

    softmax:      softmax over E, top-k, optionally renormalised        (mixtral, qwen*, olmoe, hunyuan)
    topk_softmax: top-k of the logits, softmax over those k             (gpt_oss)
    sigmoid:      sigmoid scores; selection on scores + score_bias_E restricted to the best `topk_group`
                  of `n_group` groups (a group scores the sum of its best 2), weights are the plain
                  scores, optionally renormalised, times routed_scaling_factor  (deepseek_v3)
    """
    logits_TE = router_logits_TE.float()
    K = router.top_k
    if router.scoring == "topk_softmax":
        top_TK, ids_TK = torch.topk(logits_TE, K, dim=-1)
        return torch.softmax(top_TK, dim=-1), ids_TK
    if router.scoring == "softmax":
        weights_TK, ids_TK = torch.topk(torch.softmax(logits_TE, dim=-1), K, dim=-1)
        if router.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK, ids_TK
    if router.scoring != "sigmoid":
        raise ValueError(f"unknown router scoring {router.scoring!r}")
    T, E = logits_TE.shape
    G = router.n_group
    scores_TE = logits_TE.sigmoid()
    choice_TE = scores_TE if score_bias_E is None else scores_TE + score_bias_E.float()
    group_scores_TG = choice_TE.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores_TG, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask_TG = torch.zeros_like(group_scores_TG).scatter_(1, group_idx, 1)
    expert_mask_TE = group_mask_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
    choice_TE = choice_TE.masked_fill(~expert_mask_TE.bool(), float("-inf"))
    ids_TK = torch.topk(choice_TE, k=K, dim=-1, sorted=False)[1]
    weights_TK = scores_TE.gather(1, ids_TK)
    if router.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * router.routed_scaling_factor, ids_TK


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
    # 1. sort the N = T*K (token, slot) pairs by expert id, so each expert's tokens are one contiguous
    #    run, and gather their inputs once
    ids_N = topk_ids_TK.reshape(-1)
    order_N = torch.argsort(ids_N, stable=True)
    counts = torch.bincount(ids_N, minlength=max(experts) + 1).tolist()
    tok_N = order_N // K
    x_ND = x_TD.index_select(0, tok_N)
    weights_N = topk_weights_TK.reshape(-1).float()[order_N]
    # 2. one FFN GEMM chain per expert held here, over its run (a view, no copy)
    outs, runs, start = [], [], 0
    for e, n in enumerate(counts):
        if n and e in experts:
            outs.append(experts[e](x_ND[start:start + n]))
            runs.append((start, n))
        start += n
    if not outs:
        return y_TD.to(x_TD.dtype)
    out_nD = torch.cat(outs) if len(outs) > 1 else outs[0]
    if sum(n for _, n in runs) != start:       # some pairs went to experts held elsewhere
        keep_n = torch.cat([torch.arange(s, s + n, device=x_TD.device) for s, n in runs])
        tok_N, weights_N = tok_N[keep_n], weights_N[keep_n]
    # 3. one weighted scatter-add back into the tokens
    y_TD.index_add_(0, tok_N, out_nD.float() * weights_N[:, None])
    return y_TD.to(x_TD.dtype)


def local_dispatch(experts_by_layer: Mapping[int, Mapping[int, ExpertWeights]]) -> ExpertDispatch:
    """The in-process reference transport: every expert of every layer lives here."""
    def dispatch(layer_idx: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                 topk_weights_TK: torch.Tensor) -> torch.Tensor:
        return experts_forward(x_TD, topk_ids_TK, topk_weights_TK, experts_by_layer[layer_idx])
    return dispatch
