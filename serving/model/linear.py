"""y = x W^T + b with the weight prepacked once for oneDNN (CPU, fp32), else plain `F.linear`.

On CPU, `F.linear` re-reads W in its stored [O, I] layout every call; oneDNN's prepacked
("reordered") layout runs the small-M GEMMs of decoding 2-3x faster (lm_head 64x512x32k:
~35 -> ~120 GFLOP/s on this 2-core box). The math is the same GEMM; only the summation
blocking differs (fp32 results agree to ~1e-6 relative).

Packing needs mkldnn and, for bf16, AVX-512/AVX-NE-CONVERT; where it is not available (GPU,
bf16 on AVX2, MOE_PACKED_LINEAR=0) the plain path runs. The packed copy is an extra copy of W.
Shape legend: T rows, I in features, O out features.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

PACKING = os.environ.get("MOE_PACKED_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()


def _pack(weight_OI: torch.Tensor) -> torch.Tensor | None:
    if not PACKING or weight_OI.device.type != "cpu" or weight_OI.dtype != torch.float32:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight_OI.contiguous(), None)
    except RuntimeError:          # this CPU / build cannot run the packed kernel
        return None


class Linear:
    """A linear layer's weight [O, I] and bias [O], callable on x [..., I] -> [..., O]."""
    __slots__ = ("weight_OI", "bias_O", "_packed")

    def __init__(self, weight_OI: torch.Tensor, bias_O: torch.Tensor | None = None):
        self.weight_OI, self.bias_O = weight_OI, bias_O
        self._packed = _pack(weight_OI)

    @classmethod
    def fused(cls, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> "Linear":
        """One GEMM for several linears on the same input (outputs concatenated in order)."""
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        return cls(torch.cat(list(weights)), bias)

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def __call__(self, x_TI: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x_TI.dtype == torch.float32 and x_TI.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x_TI, self._packed, self.bias_O, "none", [], "")
        return F.linear(x_TI, self.weight_OI, self.bias_O)
