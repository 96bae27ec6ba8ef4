"""serving/model/linear.py: the prepacked CPU GEMM and its row buckets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serving.model.linear import EXACT_ROWS, PACKING, Linear, bucket_rows, packable_dtypes, packed_compute_dtypes


def test_bucket_rows_pads_little_and_keeps_few_shapes():
    buckets = set()
    for rows in range(1, 4097):
        b = bucket_rows(rows)
        buckets.add(b)
        assert b >= rows
        assert b == rows if rows <= EXACT_ROWS else b <= rows * 1.125, rows
        assert bucket_rows(b) == b           # a bucket is its own bucket
    assert len(buckets) <= 100               # oneDNN JITs one kernel per shape: keep them few


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 16, 33, 65, 200, 2049])
def test_linear_equals_f_linear_at_every_row_count(dtype, tol, rows):
    g = torch.Generator().manual_seed(rows)
    w_OI = (torch.randn(96, 64, generator=g) * 0.1).to(dtype)
    b_O = (torch.randn(96, generator=g) * 0.1).to(dtype)
    x_TI = torch.randn(rows, 64, generator=g).to(dtype)
    lin = Linear(w_OI, b_O)
    y = lin(x_TI)
    assert y.shape == (rows, 96) and y.dtype == dtype
    ref = F.linear(x_TI.float(), w_OI.float(), b_O.float())
    assert torch.allclose(y.float(), ref, atol=tol, rtol=tol)
    # the padded rows never leak into the result, and each row is independent of the others
    assert torch.allclose(lin(x_TI[:1]).float(), y[:1].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,native", [
    (torch.bfloat16, torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    (torch.float16, torch.ops.mkldnn._is_mkldnn_fp16_supported())])
def test_half_weights_are_packed_natively_where_onednn_runs_them_else_in_fp32(dtype, native):
    """Packed in their own dtype where oneDNN runs it natively; elsewhere (AVX2 only, where torch's
    plain half GEMM is a slow scalar path) packed in fp32, the GEMM run on the upcast rows and its
    output rounded back: exactly the fp32 GEMM of the same numbers, rounded once."""
    g = torch.Generator().manual_seed(3)
    w_OI, b_O = torch.randn(48, 32, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    lin = Linear(w_OI, b_O)
    assert lin.packed == PACKING and (dtype in packable_dtypes()) == PACKING
    assert packed_compute_dtypes().get(dtype) == ((dtype if native else torch.float32) if PACKING else None)
    assert Linear(torch.randn(32, 16)).packed == PACKING
    x_TI = torch.randn(5, 32, generator=g).to(dtype)
    y_TO = lin(x_TI)
    assert y_TO.dtype == dtype and y_TO.shape == (5, 48)
    ref_TO = F.linear(x_TI.float(), w_OI.float(), b_O.float())
    if PACKING and not native:       # one rounding of the fp32 result (up to the summation order)
        torch.testing.assert_close(y_TO, ref_TO.to(dtype), rtol=1e-2, atol=1e-2)
        assert (y_TO.float() - ref_TO).abs().max() <= (ref_TO.to(dtype).float() - ref_TO).abs().max() * 2 + 1e-5
    else:
        torch.testing.assert_close(y_TO.float(), ref_TO, rtol=2e-2, atol=2e-2)
