"""y = x W^T + b with the weight prepacked once for oneDNN (CPU, fp32), else plain `F.linear`.

On CPU, `F.linear` re-reads W in its stored [O, I] layout every call; oneDNN's prepacked
("reordered") layout runs the small-M GEMMs of decoding 2-3x faster (lm_head 64x512x32k:
~35 -> ~120 GFLOP/s on this 2-core box). The math is the same GEMM; only the summation
blocking differs (fp32 results agree to ~1e-6 relative).

bf16 is packed in bf16 where oneDNN runs bf16 natively (AVX512-BF16 / AMX:
`_is_mkldnn_bf16_supported`); there it is 1.5-3x the plain bf16 GEMM (64x512x32k: ~280 -> ~450
GFLOP/s on a 2-core Sapphire Rapids). Where it does not (AVX2 only), torch's plain bf16 GEMM is a
slow scalar path (64x512x32k: 210 ms on a 2-core AVX2 EPYC), so the weight is packed in fp32 and the
GEMM runs in fp32 on the upcast rows, its output rounded back to bf16 (44 ms there, the fp32 GEMM's
speed; as exact as a native bf16 GEMM, which accumulates in fp32 too): the packed copy is then 2x
the bf16 weight, 6 bytes a parameter in all against fp32 serving's 8. The same for fp16.
Where packing is not available (GPU, MOE_PACKED_LINEAR=0) the plain path runs.
The packed copy is an extra copy of W.
oneDNN builds (JITs) a kernel per input shape and caches it: the first GEMM with a new row count
costs 1-2 ms more than the GEMM itself (bf16: a 0.5 ms GEMM takes 2.5 ms). A serving engine sees a
new row count in nearly every step (tokens per expert, per prefill chunk, sequences in the batch),
so on CPU the rows are padded up to a few fixed sizes (`bucket_rows`: exact up to 32, then 8 sizes
per octave, so at most 12.5% padding) and the padded rows' outputs are dropped.

Those kernels are then built once per process, at start (`warm_up`), not on the first requests:
oneDNN keys each one by the GEMM's shapes, dtypes and the OpenMP thread count of the calling thread
(not by the weight; a new thread starts at OpenMP's default until torch sets its count), so one GEMM
per distinct weight shape, row bucket and thread count, on the thread that will serve, covers every
layer of that shape. oneDNN's cache holds 1024 kernels by default, fewer than a model's buckets x
shapes x thread counts, and a kernel it evicts is built again when next needed: raised to
`KERNEL_CACHE`.
Shape legend: T rows, M rows padded to a bucket, I in features, O out features.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

PACKING = os.environ.get("MOE_PACKED_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()
# oneDNN reads its kernel-cache size when it first builds a kernel (after this import: packing is
# here); an explicit setting in the environment wins
KERNEL_CACHE = 4096
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(KERNEL_CACHE))
WARM_UP = os.environ.get("MOE_WARM_KERNELS", "1") != "0"
WARM_UP_GFLOP = 20.0    # per weight shape and thread count: ~0.1 s of fp32 GEMMs on this 2-core machine


@functools.cache
def native_cpu_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU runs GEMMs in `dtype` at its speed: fp32 always; bf16 / fp16 where oneDNN
    has kernels for them (AVX512-BF16 / AVX512-FP16 / AMX), not on AVX2 alone."""
    if dtype == torch.bfloat16:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True


def packed_compute_dtypes() -> dict[torch.dtype, torch.dtype]:
    """weight dtype -> the dtype its prepacked oneDNN copy (and the GEMM) is in, on this machine:
    its own where oneDNN runs it natively, else fp32 (the rows upcast, the output rounded back)."""
    if not PACKING:
        return {}
    return {d: d if native_cpu_gemm(d) else torch.float32 for d in (torch.float32, torch.bfloat16, torch.float16)}


def packable_dtypes() -> frozenset[torch.dtype]:
    """The dtypes whose CPU weights get a prepacked oneDNN copy on this machine."""
    return frozenset(_COMPUTE)


_COMPUTE = packed_compute_dtypes()
EXACT_ROWS = 32


def bucket_rows(rows: int) -> int:
    """The row count a CPU GEMM of `rows` rows runs at: `rows` up to 32, else rounded up to a
    multiple of 2**(floor(log2 rows) - 3) (8 buckets per octave, so <= 12.5% padding)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def _pack(weight_OI: torch.Tensor) -> torch.Tensor | None:
    """The prepacked copy of W, in its compute dtype (`packed_compute_dtypes`), or None."""
    if weight_OI.device.type != "cpu" or weight_OI.dtype not in _COMPUTE:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight_OI.to(_COMPUTE[weight_OI.dtype]).contiguous(), None)
    except RuntimeError:          # this CPU / build cannot run the packed kernel
        return None


class Linear:
    """A linear layer's weight [O, I] and bias [O], callable on x [..., I] -> [..., O]."""
    __slots__ = ("weight_OI", "bias_O", "_packed", "_upcast", "_upcast_bias_O")

    def __init__(self, weight_OI: torch.Tensor, bias_O: torch.Tensor | None = None):
        self.weight_OI, self.bias_O = weight_OI, bias_O
        self._packed = _pack(weight_OI)
        # a half weight without native kernels: the packed GEMM's dtype (fp32) and its bias in it
        self._upcast = self._packed.dtype if self._packed is not None and self._packed.dtype != weight_OI.dtype else None
        self._upcast_bias_O = None if self._upcast is None or bias_O is None else bias_O.to(self._upcast)

    @classmethod
    def fused(cls, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
              ) -> tuple["Linear", tuple[torch.Tensor, ...]]:
        """One GEMM for several linears on the same input (outputs concatenated in order), and views
        of its weight, one per input weight: callers keep those in place of the tensors they passed,
        so the weights are held once (plus the packed copy), not twice."""
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        linear = cls(torch.cat(list(weights)), bias)
        return linear, tuple(linear.weight_OI.split([w.shape[0] for w in weights]))

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def __call__(self, x_TI: torch.Tensor) -> torch.Tensor:
        if x_TI.device.type != "cpu":
            return F.linear(x_TI, self.weight_OI, self.bias_O)
        T = x_TI.shape[0] if x_TI.dim() == 2 else None
        M = bucket_rows(T) if T is not None else None
        x_MI = F.pad(x_TI, (0, 0, 0, M - T)) if M is not None and M != T else x_TI
        if self._packed is not None and x_MI.dtype == self.weight_OI.dtype:
            if self._upcast is None:
                y_MO = torch.ops.mkldnn._linear_pointwise(x_MI, self._packed, self.bias_O, "none", [], "")
            else:
                y_MO = torch.ops.mkldnn._linear_pointwise(x_MI.to(self._upcast), self._packed, self._upcast_bias_O,
                                                          "none", [], "").to(x_MI.dtype)
        else:
            y_MO = F.linear(x_MI, self.weight_OI, self.bias_O)
        return y_MO if M is None or M == T else y_MO[:T]


@dataclass(frozen=True, slots=True)
class WarmTarget:
    """A linear as the model calls it, and the most rows it is called with."""
    call: Callable[[torch.Tensor], torch.Tensor]   # the Linear, or a wrapper of it that sets its threads
    linear: Linear
    max_rows: int


@dataclass(frozen=True, slots=True)
class WarmUpReport:
    shapes: int        # distinct (weight shape, dtype, bias, threads) warmed
    gemms: int         # GEMMs run
    seconds: float


def warm_up(targets: Iterable[WarmTarget], threads_for: Callable[[int], int] | None = None,
            gflop_per_shape: float = WARM_UP_GFLOP) -> WarmUpReport:
    """Build now the oneDNN kernels the packed CPU linears of `targets` will need: one GEMM of zeros
    per distinct weight shape (and dtype, bias, threads), at each row bucket up to its `max_rows`,
    smallest first, until that shape's GEMMs would exceed `gflop_per_shape` (the largest row counts
    of large models stay cold: there the GEMM outweighs building its kernel).
    `threads_for(rows)`: the torch threads a call with that many rows runs on (the engine's
    StepThreads); None: the current count. A target whose call sets its own (`threads` attribute,
    torch_threads.WithThreads) runs on those. Off with MOE_WARM_KERNELS=0 (for A/B measurements)."""
    t0, done, gemms = time.perf_counter(), set(), 0
    if not WARM_UP:
        return WarmUpReport(0, 0, 0.0)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for t in targets:
                w = t.linear.weight_OI
                if not t.linear.packed or t.max_rows < 1:
                    continue
                flops, M = 0.0, 0
                while M < t.max_rows:
                    M = bucket_rows(M + 1)
                    flops += 2.0 * M * w.shape[0] * w.shape[1]
                    if flops > gflop_per_shape * 1e9:
                        break
                    threads = getattr(t.call, "threads", None) or (threads_for(M) if threads_for else before)
                    key = (tuple(w.shape), w.dtype, t.linear.bias_O is not None, threads, M)
                    if key in done:
                        continue
                    done.add(key)
                    torch.set_num_threads(threads)
                    t.call(w.new_zeros(M, w.shape[1]))
                    gemms += 1
    finally:
        torch.set_num_threads(before)
    return WarmUpReport(len({k[:4] for k in done}), gemms, time.perf_counter() - t0)
