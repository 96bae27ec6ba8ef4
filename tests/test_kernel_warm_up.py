"""linear.warm_up: the oneDNN GEMM kernels an engine's steps need are built at its first step.

The end-to-end check reads oneDNN's own log (`torch.backends.mkldnn.verbose`): every kernel it
builds prints `create:cache_miss`, every one it finds built `create:cache_hit`. An engine whose
kernels were warmed builds none for its requests' GEMMs; one started with MOE_WARM_KERNELS=0 does
(the control: it shows the check can fail).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from serving.model import linear
from serving.model.checkpoint import write_checkpoint
from serving.model.linear import PACKING, Linear, WarmTarget, bucket_rows, warm_up

REPO = Path(__file__).resolve().parent.parent
needs_packing = pytest.mark.skipif(not PACKING, reason="no prepacked oneDNN linears on this machine")


class Recorder:
    """A linear's call as a model makes it, recording the rows and torch threads of each call."""

    def __init__(self, lin: Linear, threads: int | None = None):
        self.lin, self.calls = lin, []
        if threads is not None:
            self.threads = threads       # a wrapper that sets its own threads (torch_threads.WithThreads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], torch.get_num_threads()))
        return self.lin(x)


def _buckets(max_rows: int) -> list[int]:
    return sorted({bucket_rows(m) for m in range(1, max_rows + 1)})


@needs_packing
def test_one_gemm_per_shape_and_bucket_on_the_threads_a_call_of_that_size_runs_on():
    a, b, c = (Linear(torch.randn(o, 16)) for o in (32, 32, 48))      # a and b: one shape
    ra, rb, rc = Recorder(a), Recorder(b), Recorder(c)
    head = Recorder(Linear(torch.randn(40, 16)), threads=2)
    before = torch.get_num_threads()
    threads_for = lambda rows: 1 if rows < 40 else 2                  # noqa: E731
    report = warm_up([WarmTarget(ra, a, 70), WarmTarget(rb, b, 70), WarmTarget(rc, c, 20),
                      WarmTarget(head, head.lin, 8)], threads_for=threads_for)
    assert [m for m, _ in ra.calls] == _buckets(70) and rb.calls == []     # b's kernels are a's
    assert all(t == threads_for(m) for m, t in ra.calls)
    assert [m for m, _ in rc.calls] == list(range(1, 21)) and all(t == 1 for _, t in rc.calls)
    assert head.calls == [(m, 2) for m in range(1, 9)]
    assert report.shapes == 4 and report.gemms == len(_buckets(70)) + 20 + 8   # a on 1 and 2 threads, c, head
    assert torch.get_num_threads() == before


@needs_packing
def test_the_largest_buckets_stay_cold_past_the_flop_budget():
    lin = Linear(torch.randn(1024, 512))
    rec = Recorder(lin)
    per_row = 2 * 1024 * 512
    warm_up([WarmTarget(rec, lin, 4096)], gflop_per_shape=100 * per_row / 1e9)
    rows = [m for m, _ in rec.calls]
    assert rows == list(range(1, 14))          # 1 + 2 + ... + 13 = 91 rows <= 100 < 105
    assert sum(rows) * per_row <= 100 * per_row


def test_unpacked_linears_and_the_off_switch_run_nothing(monkeypatch):
    lin = Linear(torch.randn(8, 4, dtype=torch.float64))   # never packed: the plain F.linear path
    rec = Recorder(lin)
    assert not lin.packed and warm_up([WarmTarget(rec, lin, 64)]).gemms == 0 and rec.calls == []
    packed = Linear(torch.randn(8, 4))
    monkeypatch.setattr(linear, "WARM_UP", False)
    rec = Recorder(packed)
    assert warm_up([WarmTarget(rec, packed, 64)]).gemms == 0 and rec.calls == []


# ---- end to end: oneDNN's own count of the kernels it builds while the engine serves ----

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from serving.deployments.config import AppConfig
    from serving.deployments.engine_replica import build_engine
    from serving.engine.request import GenerationRequest
    from serving.model.config import MoEConfig
    from serving.model.sampling import SamplingParams
    from serving.parallel.placement import Placement

    ckpt = sys.argv[1]
    torch.set_num_threads(1)
    placement = Placement.build(MoEConfig.from_dir(ckpt), 2, "contiguous")
    engine, _ = build_engine(AppConfig(checkpoint=ckpt, expert_shards=2, transport="local", max_num_seqs=8,
                                       max_num_batched_tokens=96, max_model_len=128), placement)

    def run(prompts, max_tokens):
        done = []
        for i, p in enumerate(prompts):
            engine.add_request(GenerationRequest(
                request_id=f"{p}-{i}-{max_tokens}", prompt_token_ids=tuple(range(3, 3 + p)),
                sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)),
                lambda ev: done.append(ev) if ev.finish_reason is not None else None)
        for _ in range(500):
            if len(done) == len(prompts):
                return
            engine.step()
        raise SystemExit("requests did not finish")

    run([5], 2)                                   # the first step (the replica's warm-up request)
    print("@@ start", flush=True)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        run([7, 30, 61, 2, 90], 6)                # prefills of many sizes, then mixed decode steps
        run([1, 2, 3, 4, 5, 6, 7, 8], 3)
    print("@@ end", flush=True)
    w = engine.kernel_warm_up
    print("@@ report", json.dumps(None if w is None else [w.shapes, w.gemms]), flush=True)
""")


def _kernels_built_while_serving(checkpoint: Path, warm: bool) -> tuple[int, int, object]:
    env = {**os.environ, "MOE_WARM_KERNELS": "1" if warm else "0", "PYTHONPATH": str(REPO)}
    env.pop("ONEDNN_VERBOSE", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoint)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    served = lines[lines.index("@@ start") + 1:lines.index("@@ end")]
    gemm = [ln for ln in served if ",inner_product," in ln]     # the packed linears' primitive
    misses = sum(",create:cache_miss," in ln for ln in gemm)
    hits = sum(",create:cache_hit," in ln for ln in gemm)
    report = json.loads(next(ln for ln in lines if ln.startswith("@@ report")).split(" ", 2)[2])
    return misses, hits, report


@needs_packing
def test_a_warmed_engine_builds_no_gemm_kernel_while_it_serves(tmp_path):
    ckpt = write_checkpoint("mixtral", "tiny", tmp_path / "ckpt", seed=0)
    misses, hits, report = _kernels_built_while_serving(ckpt, warm=True)
    assert hits > 50 and misses == 0, (misses, hits)
    assert report[0] >= 3 and report[1] > 100     # attention, lm_head and expert shapes; every bucket
    cold_misses, cold_hits, cold_report = _kernels_built_while_serving(ckpt, warm=False)
    assert cold_report == [0, 0] and cold_misses > 20, (cold_misses, cold_hits)
