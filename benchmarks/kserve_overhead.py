"""What the KServe v2 / Triton face costs: the same requests through moe_serving.v1 and through
inference.GRPCInferenceService, with the unmodified tritonclient, on one cluster.

    .venv/bin/python benchmarks/kserve_overhead.py [--requests 30] [--max-tokens 16]

One local cluster (`moe-serve up`, the shipped Serve config, 2 nodes, 2 shards). One request at a
time (low load), greedy, the same text prompt, the four ways interleaved so that this machine's
drift hits each alike:
- native stream: MoEClient.generate (Generate), time to the first token and to the last;
- KServe stream: tritonclient async_stream_infer with `stream` true on one open ModelStreamInfer
  stream, from sending the request to its first and last response;
- native unary: MoEClient.complete (Complete), end to end;
- KServe unary: tritonclient infer (ModelInfer), end to end.
Prints the command, the machine, p50 / p90 of each, and KServe / native as ratios of the p50s. Every
KServe completion is checked against the native one (the same greedy text).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import tritonclient.grpc as tc  # noqa: E402

from serving.client import MoEClient, build_request  # noqa: E402
from serving.ports import free_port  # noqa: E402
from serving.loadgen.stats import command_line, machine_info, percentile  # noqa: E402

CLI = [sys.executable, "-m", "serving.cli"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


def _measure(target: str, model: str, a: argparse.Namespace) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in ("native_stream_ttft", "native_stream_e2e", "kserve_stream_ttft",
                                                     "kserve_stream_e2e", "native_unary_e2e", "kserve_unary_e2e")}
    prompt = tc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    stream = tc.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    params = {"max_tokens": a.max_tokens, "temperature": 0.0}
    results: queue.Queue = queue.Queue()
    triton = tc.InferenceServerClient(target)
    triton.start_stream(callback=lambda result, error: results.put((time.perf_counter(), result, error)))
    try:
        with MoEClient(target, 60) as native:
            expected = native.complete(build_request(PROMPT, max_tokens=a.max_tokens, temperature=0)).text
            for i in range(a.warmup + a.requests):
                keep = i >= a.warmup
                t0 = time.perf_counter()
                first, texts = None, []
                for chunk in native.generate(build_request(PROMPT, max_tokens=a.max_tokens, temperature=0)):
                    first = first or time.perf_counter()
                    texts.append(chunk.text)
                t1 = time.perf_counter()
                assert "".join(texts) == expected
                if keep:
                    times["native_stream_ttft"].append(first - t0)
                    times["native_stream_e2e"].append(t1 - t0)

                t0 = time.perf_counter()
                triton.async_stream_infer(model, [prompt, stream], parameters=params, request_id=f"s{i}")
                first, texts = None, []
                while True:
                    t, result, error = results.get(timeout=60)
                    assert error is None, error
                    first = first or t
                    texts.append(result.as_numpy("text_output")[0].decode())
                    if result.as_numpy("finish_reason")[0]:
                        break
                assert "".join(texts) == expected
                if keep:
                    times["kserve_stream_ttft"].append(first - t0)
                    times["kserve_stream_e2e"].append(t - t0)

                t0 = time.perf_counter()
                text = native.complete(build_request(PROMPT, max_tokens=a.max_tokens, temperature=0)).text
                if keep:
                    times["native_unary_e2e"].append(time.perf_counter() - t0)
                assert text == expected

                t0 = time.perf_counter()
                result = triton.infer(model, [prompt], parameters=params)
                if keep:
                    times["kserve_unary_e2e"].append(time.perf_counter() - t0)
                assert result.as_numpy("text_output")[0].decode() == PROMPT + expected
    finally:
        triton.stop_stream()
        triton.close()
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "demo-mixtral-small"))
    p.add_argument("--requests", type=int, default=30, help="requests of each kind, measured")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", default=None, help="write the raw times here")
    a = p.parse_args(argv)
    print(f"command: {command_line()}\nmachine: {json.dumps(machine_info())}", flush=True)
    if not (Path(a.checkpoint) / "config.json").exists():
        subprocess.run([*CLI, "checkpoint", "--family", "mixtral", "--size", "small", "--out", a.checkpoint],
                       check=True, cwd=REPO)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    grpc_port, metrics_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="kserve-bench-") as tmp:
        state = Path(tmp) / "state"
        subprocess.run([*CLI, "up", "--checkpoint", a.checkpoint, "--expert-shards", "2", "--nodes", "2",
                        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--state-dir", str(state)],
                       check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
        try:
            times = _measure(f"127.0.0.1:{grpc_port}", Path(a.checkpoint).name, a)
        finally:
            subprocess.run([*CLI, "down", "--state-dir", str(state)], cwd=REPO, env=env, capture_output=True,
                           timeout=180)
    print(f"\n{a.requests} requests of each kind, one at a time, {len(PROMPT)}-character prompt, "
          f"{a.max_tokens} tokens, greedy")
    print(f"{'measure':<22} {'p50 ms':>8} {'p90 ms':>8}")
    for name, values in times.items():
        print(f"{name:<22} {1000 * percentile(values, 50):8.1f} {1000 * percentile(values, 90):8.1f}")
    print("\nKServe / native (p50):")
    for what in ("stream_ttft", "stream_e2e", "unary_e2e"):
        ratio = percentile(times[f"kserve_{what}"], 50) / percentile(times[f"native_{what}"], 50)
        print(f"  {what:<12} {ratio:.3f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
