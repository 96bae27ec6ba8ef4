"""serving/model/linear.py: the prepacked CPU GEMM and its row buckets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serving.model.linear import EXACT_ROWS, PACKING, Linear, bucket_rows, packable_dtypes


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


def test_bf16_is_packed_exactly_where_onednn_runs_bf16():
    lin = Linear(torch.randn(32, 16, dtype=torch.bfloat16))
    native = PACKING and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert lin.packed == native
    assert (torch.bfloat16 in packable_dtypes()) == native
    assert Linear(torch.randn(32, 16)).packed == PACKING
