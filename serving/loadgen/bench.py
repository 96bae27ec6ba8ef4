"""`moe-serve bench`: throughput and latency of a gRPC endpoint, or of the engine in-process.

  moe-serve bench --target 127.0.0.1:50051 --concurrency 64 --num-requests 64 --max-tokens 64 --json
  moe-serve bench --in-process --checkpoint DIR --concurrency 64 --num-requests 64 --max-tokens 64 --json

Every request has `--prompt-len` random token ids (seeded, ids in [3, --vocab-size)), is
greedy and ignores EOS, so it produces exactly `--max-tokens` tokens. Arrivals:
`--mode concurrency` keeps C requests in flight; `poisson` / `gamma` send at `--rate` req/s
(gamma gaps with shape `--burstiness`) with at most C in flight.

`--in-process` drives `Engine.step()` directly on this thread (no Serve, no gRPC, no
asyncio). With `--transport local` (default) the experts run in-process too: the engine's own
speed. With `--transport collective --expert-shards S --nodes N` the experts run in S shard
actors on a private local Ray cluster of N nodes, over the collective transport, as in the
cluster: the expert-parallel data plane without the serving layer (Serve, the gRPC proxy,
streaming). Comparing the three separates engine speed, distribution cost and serving cost.
Token timestamps are taken in the engine's emit callback. In-process runs also report where the
timed steps went (`step_phase_seconds`: schedule, dense, experts, head, sample, as
serving/engine/step_phases.py defines them; the `steps` line of the table).

Output: a table, or with `--json` exactly one JSON object (the command line and the
machine included).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from serving.loadgen import arrivals
from serving.loadgen.driver import RequestResult
from serving.loadgen.stats import command_line, format_table, machine_info, parse_slo, summarize


WARMUP_TOKENS = 2      # each --in-process warm-up request: a prefill and a decode step


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of the gRPC endpoint (loopback only)")
    where.add_argument("--in-process", action="store_true",
                       help="drive the engine in this process (needs --checkpoint)")
    parser.add_argument("--checkpoint", help="checkpoint dir (with --in-process)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="requests in flight (the cap, in poisson/gamma mode)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    add_prefix_arguments(parser)
    parser.add_argument("--prefix-caching", choices=["on", "off"], default="on",
                        help="--in-process: the engine's prefix caching (a cluster serves with its own)")
    parser.add_argument("--vocab-size", type=int, default=256,
                        help="prompt ids are drawn from [3, VOCAB_SIZE) (valid for any served model)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="engine dtype (--in-process; a cluster serves its own)")
    parser.add_argument("--mode", choices=arrivals.MODES, default="concurrency")
    parser.add_argument("--rate", type=float, default=None, help="req/s (poisson, gamma)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape: 1 = Poisson, < 1 burstier")
    parser.add_argument("--priority", choices=["interactive", "batch"], default="interactive")
    parser.add_argument("--slo", default=None,
                        help="goodput bounds in seconds, e.g. ttft=0.5,tpot=0.1 (also e2e, itl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="every request's (default: 0, greedy); sampled requests carry no seed")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="every request's (default: off), to measure what penalties cost")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="every request's (default: off)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="every request's (default: off)")
    parser.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                        help="--in-process: n-gram drafts per sequence and step while at most 4 run "
                             "(serving/engine/speculative.py); 0 = off")
    parser.add_argument("--prompt-logprobs", type=int, default=None, metavar="K",
                        help="every request scores its prompt (GenerateRequest.prompt_logprobs, K most likely "
                             "at each position), to measure what scoring costs: the prompts are then never taken "
                             "from the prefix cache")
    parser.add_argument("--guided-regex", default=None, metavar="PATTERN",
                        help="every request guided by this regex (GenerateRequest.guided), to measure what guided "
                             "decoding costs; EOS is then honoured where the pattern may end (e.g. '[a-z ]*' runs "
                             "to max_tokens unless the model picks EOS)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed warm-up requests first (default: concurrency, of 2 tokens)")
    parser.add_argument("--max-duration-s", type=float, default=600.0,
                        help="hard bound: requests still running then are cancelled")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per-request gRPC deadline")
    from serving.client import add_caller_arguments
    add_caller_arguments(parser)
    parser.add_argument("--expert-shards", type=int, default=1,
                        help="--in-process: expert shards behind the transport")
    parser.add_argument("--transport", choices=["local", "collective"], default="local",
                        help="--in-process: `local` computes every shard in this process; `collective` "
                             "starts a private local Ray cluster of --nodes nodes and runs each shard in "
                             "its own actor process (the cluster's data plane without Serve or gRPC)")
    parser.add_argument("--nodes", type=int, default=2, help="--in-process --transport collective: Ray nodes")
    parser.add_argument("--engine-expert-shard", choices=["on", "off"], default="on",
                        help="--in-process --transport collective: shard 0 computed by the engine's own "
                             "process (on, as the cluster runs it: AppConfig.engine_expert_shard) or by an "
                             "actor like the others (off)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="--in-process: scheduler token budget per step (default: the AppConfig's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="--in-process: torch intra-op threads (default: torch's)")
    parser.add_argument("--torch-profile", type=Path, default=None, metavar="FILE",
                        help="--in-process: run the timed requests under torch.profiler and write its "
                             "table (ops by self CPU time) to FILE; the profiler slows the run down")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")


def add_prefix_arguments(parser: argparse.ArgumentParser) -> None:
    """--prefix-len, --prefix-groups: `make_prompts`' shared prefixes (here and benchmarks/peers.py)."""
    parser.add_argument("--prefix-len", type=int, default=0,
                        help="a shared prefix of this many token ids before each prompt (a system prompt: "
                             "prefix caching reuses it)")
    parser.add_argument("--prefix-groups", type=int, default=1,
                        help="that many different shared prefixes, prompt i gets prefix i mod N")


def check_prefix_arguments(args: argparse.Namespace) -> None:
    if args.prefix_len < 0 or args.prefix_groups < 1:
        raise ValueError("--prefix-len must be >= 0 and --prefix-groups >= 1")


def _check(args: argparse.Namespace) -> None:
    if args.in_process and not args.checkpoint:
        raise ValueError("--in-process needs --checkpoint")
    if args.torch_profile is not None and not args.in_process:
        raise ValueError("--torch-profile needs --in-process")
    if args.transport != "local" and not args.in_process:
        raise ValueError("--transport needs --in-process (a cluster serves with its own)")
    if args.expert_shards < 1 or args.nodes < 1:
        raise ValueError("--expert-shards and --nodes must be >= 1")
    for name in ("concurrency", "num_requests", "max_tokens", "prompt_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    check_prefix_arguments(args)
    if args.vocab_size < 4:
        raise ValueError("--vocab-size must be >= 4")
    if args.mode != "concurrency" and not (args.rate and args.rate > 0):
        raise ValueError(f"--mode {args.mode} needs --rate > 0")


def sampling_fields(args: argparse.Namespace) -> dict[str, float]:
    """--temperature, the penalty flags and --prompt-logprobs as request / SamplingParams fields
    (the penalties and prompt_logprobs only where set; the two share their names)."""
    out = {"temperature": args.temperature}
    out.update({k: getattr(args, k) for k in ("presence_penalty", "frequency_penalty") if getattr(args, k)})
    for k in ("repetition_penalty", "prompt_logprobs"):
        if getattr(args, k) is not None:
            out[k] = getattr(args, k)
    return out


def guided_fields(args: argparse.Namespace, engine: bool) -> dict[str, Any]:
    """--guided-regex as GenerateRequest fields (engine=False) or SamplingParams fields (True): a
    guided request cannot ignore EOS."""
    if args.guided_regex is None:
        return {}
    if engine:
        from serving.model.guided import Guide
        return {"guide": Guide("regex", args.guided_regex), "ignore_eos": False}
    return {"guided": ("regex", args.guided_regex), "ignore_eos": False}


def make_prompts(n: int, prompt_len: int, vocab_size: int, seed: int, prefix_len: int = 0,
                 prefix_groups: int = 1) -> list[list[int]]:
    """n prompts of seeded random ids in [3, vocab_size): `prefix_len` ids shared by the prompts of
    each of `prefix_groups` groups (prompt i is in group i mod prefix_groups), then `prompt_len` of its own."""
    rng = np.random.default_rng(seed)
    own = rng.integers(3, vocab_size, size=(n, prompt_len)).tolist()
    if not prefix_len:
        return own
    prefixes = [np.random.default_rng([seed, prefix_len] + ([k] if k else [])).integers(
        3, vocab_size, size=prefix_len).tolist() for k in range(prefix_groups)]
    return [prefixes[i % prefix_groups] + p for i, p in enumerate(own)]


def arrival_times(args: argparse.Namespace) -> np.ndarray | None:
    """Arrival schedule (seconds) for poisson/gamma, None for closed-loop concurrency."""
    if args.mode == "concurrency":
        return None
    rng = np.random.default_rng(args.seed + 1)
    shape = 1.0 if args.mode == "poisson" else args.burstiness
    return arrivals.gamma_arrivals(args.rate, shape, args.num_requests, rng)


# ---- over gRPC --------------------------------------------------------------------------

async def _bench_grpc(args: argparse.Namespace, prompts: list[list[int]]
                      ) -> tuple[list[RequestResult], float, dict]:
    from serving.client import build_request
    from serving.loadgen.driver import GrpcDriver

    fields = {"ignore_eos": True, **sampling_fields(args), **guided_fields(args, engine=False)}

    def make(i: int, max_tokens: int = args.max_tokens, tag: str = "bench") -> tuple[Any, str]:
        return build_request(prompt_ids=prompts[i % len(prompts)], max_tokens=max_tokens,
                             priority=args.priority,
                             request_id=f"{tag}-{i}", **fields), args.priority

    from serving.client import caller_token
    async with GrpcDriver(args.target, timeout_s=args.timeout_s, max_in_flight=args.concurrency,
                          tenant=args.tenant, token=caller_token(args)) as drv:
        await drv.wait_ready(timeout_s=30.0)
        warm = args.concurrency if args.warmup is None else args.warmup
        if warm:
            wres, _ = await drv.closed_loop(lambda i: make(i, 2, "warmup"), concurrency=min(warm, args.concurrency),
                                            num_requests=warm, max_duration_s=args.max_duration_s)
            bad = [r for r in wres if not r.ok]
            if bad:
                raise RuntimeError(f"warm-up request failed: {bad[0].code}: {bad[0].details}")
        times = arrival_times(args)
        if times is None:
            results, wall = await drv.closed_loop(make, concurrency=args.concurrency,
                                                  num_requests=args.num_requests,
                                                  max_duration_s=args.max_duration_s)
        else:
            results, wall = await drv.open_loop(make, times, max_duration_s=args.max_duration_s,
                                                when_full="wait")
    return results, wall, {}


# ---- in-process ---------------------------------------------------------------------------

def build_inprocess_engine(args: argparse.Namespace):
    """An Engine for --checkpoint with the local transport (no Ray)."""
    from serving.deployments.config import AppConfig
    from serving.deployments.engine_replica import build_engine
    from serving.model.config import MoEConfig
    from serving.parallel.placement import Placement

    extra = {} if args.max_num_batched_tokens is None else {
        "max_num_batched_tokens": args.max_num_batched_tokens}
    if args.transport == "collective":
        # as an engine replica runs next to its shards (cluster/serve_config.yaml): 1 torch thread,
        # the lm_head and prefill steps on --threads; one batch per step (ping-pong lost on 2 cores)
        extra.update(nodes=args.nodes, engine_threads=1, head_threads=args.threads or len(os.sched_getaffinity(0)),
                     ping_pong=False, engine_expert_shard=args.engine_expert_shard == "on")
    cfg = AppConfig(checkpoint=args.checkpoint, expert_shards=args.expert_shards, transport=args.transport,
                    dtype=args.dtype, max_num_seqs=args.concurrency, speculative_tokens=args.speculative_tokens,
                    max_model_len=args.prefix_len + args.prompt_len + max(args.max_tokens, WARMUP_TOKENS),
                    max_tokens_limit=max(args.max_tokens, WARMUP_TOKENS),
                    prefix_caching=args.prefix_caching == "on", **extra)
    placement = Placement.build(MoEConfig.from_dir(args.checkpoint), args.expert_shards, "contiguous")
    engine, _ = build_engine(cfg, placement)
    return engine


def drive_engine(engine, prompts: list[list[int]], *, max_tokens: int, concurrency: int,
                 priority: str = "interactive", times: np.ndarray | None = None,
                 max_duration_s: float = 600.0, tag: str = "bench", sampling_extra: dict | None = None
                 ) -> tuple[list[RequestResult], float, dict]:
    """Run len(prompts) requests through `engine.step()`: closed loop at `concurrency`,
    or at the arrival `times` (seconds) with at most `concurrency` in flight (greedy, EOS ignored,
    plus `sampling_extra` SamplingParams fields)."""
    from serving.engine.request import GenerationRequest, Priority
    from serving.model.sampling import SamplingParams

    prio = Priority.BATCH if priority == "batch" else Priority.INTERACTIVE
    sampling = SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                                 **(sampling_extra or {})})
    results = [RequestResult(index=i, priority=priority, start_s=0.0) for i in range(len(prompts))]
    done: deque[int] = deque()
    t0 = time.perf_counter()

    def add(i: int) -> None:
        r = results[i]
        start = time.perf_counter()
        r.start_s = start - t0
        last = [start]

        def emit(ev: Any) -> None:
            now = time.perf_counter()
            if isinstance(ev, BaseException):
                r.code, r.details, r.e2e_s = "INTERNAL", str(ev), now - start
                done.append(i)
                return
            if ev.token_id >= 0:
                if r.ttft_s is None:
                    r.ttft_s = now - start
                else:
                    r.itl_s.append(now - last[0])
                last[0] = now
                r.tokens += 1
            if ev.finish_reason is not None:
                r.code, r.e2e_s = "OK", now - start
                r.finish_reason = getattr(ev.finish_reason, "value", str(ev.finish_reason))
                done.append(i)

        engine.add_request(GenerationRequest(request_id=f"{tag}-{i}", prompt_token_ids=tuple(prompts[i]),
                                             sampling=sampling, priority=prio,
                                             arrival_time=time.time()), emit)

    n = len(prompts)
    next_i, in_flight, steps = 0, 0, 0
    deadline = t0 + max_duration_s
    while next_i < n or in_flight:
        now = time.perf_counter()
        if now > deadline:
            break
        while next_i < n and in_flight < concurrency and (times is None or t0 + times[next_i] <= now):
            add(next_i)
            next_i += 1
            in_flight += 1
        if engine.has_work():
            engine.step()
            steps += 1
            while done:
                done.popleft()
                in_flight -= 1
        elif in_flight:
            raise RuntimeError("engine went idle with requests in flight")
        elif next_i < n:         # open loop, nothing to do until the next arrival
            time.sleep(max(0.0, min(0.05, t0 + times[next_i] - time.perf_counter())))
    wall = time.perf_counter() - t0
    sent = results[:next_i]
    for r in sent:
        if r.code == "PENDING":
            r.code, r.details, r.e2e_s = "CANCELLED", "max duration reached", wall - r.start_s
    return sent, wall, {"engine_steps": steps}


def _bench_inprocess(args: argparse.Namespace, prompts: list[list[int]]
                     ) -> tuple[list[RequestResult], float, dict]:
    if args.transport == "collective":
        # as `moe-serve up` runs the engine: OpenMP threads sleep when idle, or the lm_head's second
        # thread spins on a core the shards need (read when torch loads, below)
        from serving.launcher import apply_ray_process_env
        apply_ray_process_env()
        from serving.deployments.worker_setup import worker_runtime_env
        from serving.local_ray import local_ray_cluster
        with local_ray_cluster(args.nodes, runtime_env=worker_runtime_env()):
            return _bench_engine(args, prompts)
    return _bench_engine(args, prompts)


def _bench_engine(args: argparse.Namespace, prompts: list[list[int]]
                  ) -> tuple[list[RequestResult], float, dict]:
    import torch
    if args.threads and args.transport == "local":
        torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    engine = build_inprocess_engine(args)
    load_s = time.perf_counter() - t_load
    try:
        return _drive_timed(args, prompts, engine, load_s)
    finally:
        close = getattr(engine.dispatch.transport, "close", None)    # the shard actors (collective)
        if close is not None:
            close()


def _drive_timed(args: argparse.Namespace, prompts: list[list[int]], engine, load_s: float
                 ) -> tuple[list[RequestResult], float, dict]:
    import torch
    warm = args.concurrency if args.warmup is None else args.warmup
    if warm:
        wprompts = make_prompts(warm, args.prompt_len, args.vocab_size, args.seed + 7, args.prefix_len,
                                args.prefix_groups)
        drive_engine(engine, wprompts, max_tokens=WARMUP_TOKENS, concurrency=args.concurrency, tag="warmup")
    if args.guided_regex is not None:
        engine.prepare_guides()                  # as an engine core does at its warm-up
    st = engine.stats
    steps0, step_s0, phases0 = st.steps_total, st.step_seconds_total, dict(st.phase_seconds_total)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) \
        if args.torch_profile is not None else contextlib.nullcontext()
    with torch.inference_mode(), prof:
        results, wall, extra = drive_engine(
            engine, prompts, max_tokens=args.max_tokens, concurrency=args.concurrency,
            priority=args.priority, times=arrival_times(args), max_duration_s=args.max_duration_s,
            sampling_extra={**sampling_fields(args), **guided_fields(args, engine=True)})
    steps = st.steps_total - steps0
    extra.update(load_s=load_s, mean_step_s=(st.step_seconds_total - step_s0) / steps if steps else None,
                 step_phase_seconds={k: v - phases0.get(k, 0.0) for k, v in st.phase_seconds_total.items()})
    if args.torch_profile is not None:
        extra["torch_profile"] = write_profile(prof, args.torch_profile, wall)
    return results, wall, extra


def write_profile(prof, path: Path, wall_s: float, top: int = 12) -> list[dict]:
    """The profiler's op table (by self CPU time) to `path`; returns the top ops with their share
    of the wall time."""
    averages = prof.key_averages()          # aggregates every recorded event: once
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(averages.table(sort_by="self_cpu_time_total", row_limit=40))
    return [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
             "share_of_wall": e.self_cpu_time_total / 1e6 / max(wall_s, 1e-9)} for e in events[:top]]


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---- entry ------------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> int:
    """`moe-serve bench`: 0 if every request finished OK, 1 if some failed, 2 on bad arguments."""
    try:
        _check(args)
        slo = parse_slo(args.slo)
        if args.target:
            from serving.loadgen.driver import ensure_loopback
            ensure_loopback(args.target)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_at_start = _loadavg()
    prompts = make_prompts(args.num_requests, args.prompt_len, args.vocab_size, args.seed, args.prefix_len,
                           args.prefix_groups)
    if args.in_process:
        results, wall, extra = _bench_inprocess(args, prompts)
    else:
        results, wall, extra = asyncio.run(_bench_grpc(args, prompts))
    summary = summarize(results, wall, slo)
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": {**machine_info(), "load_avg_1m_at_start": load_at_start},
        "path": "in-process" if args.in_process else "grpc",
        "config": {k: getattr(args, k) for k in (
            "target", "checkpoint", "concurrency", "num_requests", "max_tokens", "prompt_len", "prefix_len",
            "prefix_groups", "prefix_caching",
            "dtype", "mode", "rate", "burstiness", "priority", "seed", "expert_shards", "transport", "nodes",
            "engine_expert_shard", "threads", "repetition_penalty", "frequency_penalty", "presence_penalty",
            "prompt_logprobs", "guided_regex", "speculative_tokens")},
        **summary, **extra}
    if args.json:
        print(json.dumps(report))
    else:
        where = (f"engine in-process ({args.checkpoint}, {args.dtype}, {args.transport} transport)"
                 if args.in_process else args.target)
        print(f"command   {report['command']}\nmachine   {report['machine']['cpu_model']}, "
              f"{report['machine'].get('cores_available', report['machine']['cpu_count'])} cores, "
              f"load average {load_at_start} at start, torch threads "
              f"{report['machine'].get('torch_threads', '-')}\n"
              f"path      {where}   mode {args.mode}   C={args.concurrency} "
              f"N={args.num_requests} prompt={args.prompt_len}"
              + (f" (+ {args.prefix_len} shared)" if args.prefix_len else "") + f" T={args.max_tokens}")
        print(format_table(summary))
        if report.get("step_phase_seconds"):
            phases = "  ".join(f"{k} {v:.3f}" for k, v in report["step_phase_seconds"].items())
            print(f"steps     mean {1e3 * (report['mean_step_s'] or 0.0):.1f} ms; phases (s): {phases}")
    return 0 if summary["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-serve bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
