"""Ping-pong micro-batches: attention of one half of the step runs while the other half's
tokens are with the expert shards.

The step's B sequences are split in two halves, A and B, with about as many new tokens each.
Each half runs as its own `MoEModel.forward_steps` generator, which pauses at every MoE layer.
The driver alternates:

    A: attention L0 -> submit A's L0 experts ............ wait A L0 -> attention L1 -> submit ...
    B:                 attention L0 -> submit B's L0 experts ........ wait B L0 -> attention L1 ...

so while the shards compute one half's experts (or the transport carries them), this process
computes the other half's attention. Only worth it when the experts are elsewhere: the
dispatcher must be able to `submit` (serve and collective transports). The math is the same as
one forward over the whole batch; only the order of work changes.
"""
from __future__ import annotations

import torch

from serving.model.kv_cache import KVCache
from serving.model.model import BatchLayout, MoEModel
from serving.parallel.dispatcher import ExpertDispatcher, PendingDispatch

MIN_SEQS = 2     # fewer sequences: one forward (nothing to overlap)


def split_in_two(batch: BatchLayout) -> int:
    """Index of the first sequence of the second half: the halves hold about T/2 new tokens each,
    and neither is empty (needs B >= 2)."""
    half, acc = sum(batch.q_lens) / 2, 0
    for b, q in enumerate(batch.q_lens[:-1]):
        acc += q
        if acc >= half:
            return b + 1
    return len(batch.q_lens) - 1


def _slice(batch: BatchLayout, lo: int, hi: int) -> BatchLayout:
    return BatchLayout(batch.slots[lo:hi], batch.start_pos[lo:hi], batch.q_lens[lo:hi],
                       None if batch.block_tables is None else batch.block_tables[lo:hi])


@torch.inference_mode()      # the dispatch and combine between the generators' steps too
def forward_ping_pong(model: MoEModel, input_ids_T: torch.Tensor, batch: BatchLayout, kv: KVCache,
                      dispatcher: ExpertDispatcher) -> torch.Tensor:
    """Logits of the last new token of each sequence [B, V], as `model.forward` gives them."""
    B = len(batch.q_lens)
    if B < MIN_SEQS:
        return model.forward(input_ids_T, batch, kv, dispatcher)
    cut = split_in_two(batch)
    t_cut = sum(batch.q_lens[:cut])
    halves = [model.forward_steps(input_ids_T[:t_cut], _slice(batch, 0, cut), kv),
              model.forward_steps(input_ids_T[t_cut:], _slice(batch, cut, B), kv)]
    pending: list[PendingDispatch | None] = [None, None]
    logits: list[torch.Tensor | None] = [None, None]

    def advance(i: int, y_TD: torch.Tensor | None) -> None:
        """Run half i to its next MoE layer and submit that layer's experts (or finish it)."""
        try:
            call = next(halves[i]) if y_TD is None else halves[i].send(y_TD)
        except StopIteration as done:
            logits[i] = done.value
            return
        pending[i] = dispatcher.submit(call.layer, call.h_TD, call.topk_ids_TK, call.topk_weights_TK)

    try:
        advance(0, None)
        advance(1, None)
        i = 0
        while pending[0] is not None or pending[1] is not None:
            if pending[i] is not None:
                p, pending[i] = pending[i], None
                advance(i, p.wait())
            i ^= 1
    except BaseException:
        # finish the other half's calls before giving up: a collective transport would otherwise
        # hand their late answers to the next step's receives
        for p in pending:
            if p is not None:
                try:
                    p.wait()
                except Exception:  # noqa: BLE001 -- the first error is the one raised
                    pass
        raise
    finally:
        for h in halves:
            h.close()
    return torch.cat([logits[0], logits[1]])
