"""A burst at a cluster that has just come up: kernels built at start against built on demand.

    .venv/bin/python benchmarks/cold_start.py [--rounds 2] [--burst 64] [--transport collective]
    .venv/bin/python benchmarks/cold_start.py --burst 1 --requests 12   (one request at a time)

The case it stands for: an engine replica that joins during a spike gets a burst of requests the
moment it is ready. On CPU each GEMM shape (rows x weight shape x threads) needs a oneDNN kernel
built (JIT) the first time it runs; the engine and the shards build all of them at start
(`MOE_WARM_KERNELS=1`, the default: serving/model/linear.py) or, with `MOE_WARM_KERNELS=0`, in the
steps of the first requests. Per round, two fresh clusters (`moe-serve up`, the shipped Serve config
sized for one batch of --burst requests on one engine replica and one replica per shard, no
autoscaling), one with each setting, in alternating order; on each, as soon as `up` returns:
  cold    --requests requests (default --burst), --burst at a time (--prompt-len random tokens,
          --max-tokens greedy), no warm-up
  again   the same with other prompts (every kernel built by now either way)
Prints the command, the machine, and per cluster TTFT p50 / p99 and output tok/s of both bursts,
then the ratios of the cold runs (warmed / not warmed) in the same round.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from _cluster import CLI, DEMO_CHECKPOINT, REPO, ensure_checkpoint, local_cluster, print_header
from serving.launcher import DEFAULT_CONFIG


def _config(path: Path, a: argparse.Namespace) -> Path:
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = cfg["applications"][0]
    app["args"].update(max_num_seqs=max(a.burst, 16), max_queued=max(a.burst, 16), max_model_len=a.prompt_len + a.max_tokens,
                       max_tokens_limit=max(a.max_tokens, 2), token_budget=0, ttft_slo_s=1e6, dtype=a.dtype)
    for d in app["deployments"]:
        auto = d.get("autoscaling_config")
        if auto:
            auto.update(min_replicas=1, max_replicas=1, initial_replicas=1)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _burst(a: argparse.Namespace, target: str, seed: int) -> dict:
    cmd = [*CLI, "bench", "--target", target, "--concurrency", str(a.burst), "--num-requests", str(a.requests or a.burst),
           "--warmup", "0", "--max-tokens", str(a.max_tokens), "--prompt-len", str(a.prompt_len),
           "--vocab-size", "32000", "--seed", str(seed), "--timeout-s", "300", "--max-duration-s", "300", "--json"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    if rep["failed"]:
        raise RuntimeError(f"{rep['failed']} of {rep['num_requests']} requests failed: {rep['codes']}")
    return {k: rep[k] for k in ("ttft_p50_s", "ttft_p99_s", "ttft_mean_s", "output_tokens_per_s", "e2e_p99_s")}


def _run(a: argparse.Namespace, work: Path, warm: bool, seed: int) -> dict:
    extra = ("--transport", a.transport) if a.transport else ()
    with local_cluster(a.checkpoint, _config(work / "serve_config.yaml", a), work / "state", extra=extra,
                       env={"MOE_WARM_KERNELS": "1" if warm else "0"}) as c:
        return {"cold": _burst(a, c.target, seed), "again": _burst(a, c.target, seed + 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--burst", type=int, default=64, help="requests at a time")
    p.add_argument("--requests", type=int, default=None, help="requests in all (default: --burst)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--transport", choices=("serve", "collective"), default=None,
                   help="default: the Serve config's")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    head = print_header()
    ensure_checkpoint(a.checkpoint)
    rows = []
    for r in range(a.rounds):
        for warm in ((True, False) if r % 2 == 0 else (False, True)):
            with tempfile.TemporaryDirectory(prefix="cold-start-") as d:
                res = _run(a, Path(d), warm, seed=100 * r)
            rows.append({"round": r + 1, "warm_kernels": warm, **res})
            c, g = res["cold"], res["again"]
            print(f"round {r + 1}  kernels {'at start ' if warm else 'on demand'}  cold run: TTFT p50 "
                  f"{c['ttft_p50_s'] * 1e3:6.1f} ms  mean {c['ttft_mean_s'] * 1e3:6.1f}  p99 {c['ttft_p99_s'] * 1e3:6.1f} ms  "
                  f"{c['output_tokens_per_s']:6.0f} tok/s   again: TTFT p50 {g['ttft_p50_s'] * 1e3:6.1f} ms  mean "
                  f"{g['ttft_mean_s'] * 1e3:6.1f}  p99 {g['ttft_p99_s'] * 1e3:6.1f} ms  {g['output_tokens_per_s']:6.0f} tok/s", flush=True)
        on, off = (next(x["cold"] for x in rows[-2:] if x["warm_kernels"] is w) for w in (True, False))
        print(f"round {r + 1}  cold run, at start / on demand: TTFT p50 "
              f"{on['ttft_p50_s'] / off['ttft_p50_s']:.2f}x  mean {on['ttft_mean_s'] / off['ttft_mean_s']:.2f}x  p99 {on['ttft_p99_s'] / off['ttft_p99_s']:.2f}x  "
              f"tok/s {on['output_tokens_per_s'] / off['output_tokens_per_s']:.2f}x", flush=True)
    if a.json:
        a.json.write_text(json.dumps({**head, "args": vars(a) | {"json": str(a.json)}, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
