"""Tenant isolation under a spike: does a quota on the spiking tenant keep another tenant served?

    .venv/bin/python benchmarks/tenant_isolation.py [--rounds 2] [--duration 40] [--chat-max-in-flight 8]

On one local cluster (`moe-serve up`, the shipped Serve config, 2 nodes, 2 shards) two loadtests run
at once over gRPC on loopback: tenant `chat` with a spike profile (--chat-base-rate x
--spike-multiplier at the peak) and tenant `steady` with a Poisson --steady-rate. Each round runs
twice on fresh clusters: without a quota for `chat` (both tenants only named, so their metrics keep
their names), then with `chat` capped at --chat-max-in-flight requests per replica
(serving/api/tenants.py). Prints the command, the machine, and per run and tenant: admitted, shed,
interactive admit ratio, TTFT p50 / p99 of admitted interactive requests, errors, and admitted
requests that did not complete (must be 0). The rounds alternate because this machine's speed drifts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import yaml

from _cluster import CLI, DEMO_CHECKPOINT, REPO, ensure_checkpoint, local_cluster, print_header
from serving.launcher import DEFAULT_CONFIG


def _config(path: Path, chat_quota: dict) -> Path:
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["applications"][0]["args"]["tenants"] = {"quotas": {"chat": chat_quota, "steady": {}}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(a: argparse.Namespace, work: Path, capped: bool) -> dict:
    quota = {"max_in_flight": a.chat_max_in_flight} if capped else {}
    config = _config(work / "serve_config.yaml", quota)
    with local_cluster(a.checkpoint, config, work / "state") as cluster:
        common = ["--target", cluster.target, "--duration", str(a.duration), "--max-tokens", "24",
                  "--prompt-len", "32", "--json"]
        procs = {
            "chat": subprocess.Popen([*CLI, "loadtest", *common, "--tenant", "chat", "--profile", "spike",
                                      "--base-rate", str(a.chat_base_rate), "--spike-multiplier",
                                      str(a.spike_multiplier), "--out", str(work / "chat")],
                                     cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True),
            "steady": subprocess.Popen([*CLI, "loadtest", *common, "--tenant", "steady", "--profile", "poisson",
                                        "--base-rate", str(a.steady_rate), "--seed", "7", "--out", str(work / "steady")],
                                       cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True),
        }
        return {t: json.loads(p.communicate(timeout=a.duration * 4 + 300)[0].strip().splitlines()[-1])
                for t, p in procs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per loadtest")
    p.add_argument("--chat-base-rate", type=float, default=1.5)
    p.add_argument("--spike-multiplier", type=float, default=10.0)
    p.add_argument("--steady-rate", type=float, default=0.5)
    p.add_argument("--chat-max-in-flight", type=int, default=8)
    p.add_argument("--json", default=None, help="write every run's summaries here")
    a = p.parse_args(argv)
    ensure_checkpoint(a.checkpoint)
    header = print_header()
    rows, runs = [], []
    for r in range(a.rounds):
        for capped in (False, True):
            with tempfile.TemporaryDirectory(prefix="moe-iso-") as tmp:
                out = _run(a, Path(tmp), capped)
            runs.append({"round": r + 1, "chat_capped": capped, **out})
            for tenant, s in out.items():
                rows.append((r + 1, f"max_in_flight {a.chat_max_in_flight}" if capped else "none", tenant,
                             s["admitted"], s["shed"], s["interactive_admit_ratio_overall"],
                             s["ttft_p50_admitted_interactive_s"], s["ttft_p99_admitted_interactive_overall_s"],
                             s["errors"], s["admitted_not_completed"]))
    head = ("round", "chat quota", "tenant", "admitted", "shed", "interactive admitted", "TTFT p50 (s)",
            "TTFT p99 (s)", "errors", "admitted not completed")
    print("  ".join(f"{h:>12}" for h in head))
    for row in rows:
        print("  ".join(f"{v:>12.3f}" if isinstance(v, float) else f"{str(v):>12}" for v in row))
    if a.json:
        Path(a.json).write_text(json.dumps({**header, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
