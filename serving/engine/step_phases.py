"""Where an engine step's wall time goes, by phase: the counts behind
`moe_serve_engine_step_phase_seconds_total{replica, phase}` (serving/metrics.py).

The phases of one step, on the step loop's thread; they add up to the step:
  schedule  drain the inbox and choose the batch
  dense     the model's own layers: embeddings, attention, norms, router (the forward minus the two below)
  experts   inside the expert dispatcher: routing tables, posting to the shards, their compute when they are
            in this process (`local`), waiting for their answers, the combine
  head      from the last MoE layer's expert output to the logits: final norm and lm_head (and any dense
            layers after the last MoE layer)
  sample    sampling, stop checks, detokenizing, handing the tokens to their streams

With remote shards, `experts` minus the shards' own compute (`moe_serve_expert_shard_busy_seconds_total`)
is what the transport costs. With two micro-batches (ping-pong) a dispatch overlaps the other micro-batch's
dense work: `experts` is then the time the step loop is blocked in the dispatcher, and the first
micro-batch's head counts as dense.
"""
from __future__ import annotations

import time

import torch

PHASES = ("schedule", "dense", "experts", "head", "sample")


class TimedDispatch:
    """An expert dispatch that adds the time spent inside it (calls, submits, waits) to `seconds`,
    and keeps when the latest of them returned (`last_return`, perf_counter; None before the first).
    One per engine step: the engine builds it around its dispatch when the step starts."""

    def __init__(self, dispatch):
        self.inner = dispatch
        self.seconds = 0.0
        self.last_return: float | None = None

    def __call__(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                 topk_weights_TK: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner(layer, x_TD, topk_ids_TK, topk_weights_TK)
        finally:
            self._add(t0)

    def submit(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
               topk_weights_TK: torch.Tensor) -> "_TimedPending":
        t0 = time.perf_counter()
        try:
            return _TimedPending(self.inner.submit(layer, x_TD, topk_ids_TK, topk_weights_TK), self)
        finally:
            self._add(t0)

    @property
    def overlaps(self) -> bool:
        return getattr(self.inner, "overlaps", False)

    def _add(self, t0: float) -> None:
        self.last_return = time.perf_counter()
        self.seconds += self.last_return - t0


class _TimedPending:
    def __init__(self, pending, clock: TimedDispatch):
        self.pending, self.clock = pending, clock

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.pending.wait()
        finally:
            self.clock._add(t0)


def step_phases(t_start: float, t_forward: float, t_logits: float, t_end: float,
                experts: TimedDispatch) -> dict[str, float]:
    """One step's seconds per phase, from its four timestamps (perf_counter: step start, forward start,
    logits ready, tokens handed out) and the dispatch clock the forward ran with."""
    head = t_logits - experts.last_return if experts.last_return is not None else 0.0
    return {"schedule": t_forward - t_start,
            "dense": max(0.0, (t_logits - t_forward) - experts.seconds - head),
            "experts": experts.seconds, "head": head, "sample": t_end - t_logits}
