"""Dispatch micro-benchmark: per-MoE-layer dispatch + combine overhead of each transport.

    python benchmarks/dispatch_bench.py                     # small Mixtral shapes, local + serve
    python benchmarks/dispatch_bench.py --transports local --tokens 1,64 --shards 2 --json-out r.json

For every (transport, shards S, tokens T) it times one MoE layer through the
`ExpertDispatcher` (serving/parallel/dispatcher.py): route -> group tokens by shard ->
call every shard at once -> combine, and separately the same experts computed in one
place (`experts_forward`, no dispatch). overhead = dispatch - shard compute: what the
grouping, the transport and the combine cost on top of the math, per MoE layer (local:
paired per call, dispatch minus the time inside LocalTransport.run; serve: dispatch minus
the local compute p50, since the shards compute in other processes).

Transports (serving/parallel/):
  local  LocalTransport: every shard in this process (the reference, EP=1)
  serve  ServeTransport: one ExpertShard Serve deployment per shard on a local Ray cluster
         of --nodes nodes (shard s on node s mod N, as `moe-serve up` places them), called
         by DeploymentHandle from this driver, which sits on node 0 like the engine does.
  collective  CollectiveTransport: one Ray actor per shard (placed the same way) in one gloo
         group with this driver (rank 0); tokens move point to point, no Ray call per layer.
  collective-engine  the same with shard 0 computed in this process, on this thread (the
         cluster's layout: AppConfig.engine_expert_shard), the others in actors; its dispatch
         time includes shard 0's compute, which runs while the actors compute theirs.
  compiled  a candidate, not a serving transport (serving/parallel/compiled_graph_transport.py): one
         Ray actor per shard (placed the same way) behind one Ray Compiled Graph, executed once
         per layer; arguments and results go over Ray's shared-memory channels.

Inputs: the experts of layer --layer of a checkpoint (default: the seeded `small` Mixtral,
written to a temp dir), x_TD ~ N(0, 1), routing = top-k of random logits (uniform load).
Prints the command line, the machine, a table, and one JSON object (also --json-out).
Runs in about 1-3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from serving.loadgen.stats import command_line, machine_info  # noqa: E402
from serving.model.config import MoEConfig  # noqa: E402
from serving.model.moe import experts_forward  # noqa: E402
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport, ShardCall  # noqa: E402
from serving.parallel.expert_shard import ExpertShardWorker  # noqa: E402
from serving.parallel.placement import Placement  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRANSPORTS = ("local", "serve", "collective", "collective-engine", "compiled")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: write the small Mixtral)")
    p.add_argument("--transports", default="local,serve")
    p.add_argument("--tokens", type=_ints, default=[1, 16, 64, 256])
    p.add_argument("--shards", type=_ints, default=[2, 4])
    p.add_argument("--nodes", type=int, default=2, help="local Ray nodes for the serve transport")
    p.add_argument("--placement", choices=["contiguous", "round_robin"], default="contiguous")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--iters", type=int, default=100, help="most timed calls per point")
    p.add_argument("--budget-s", type=float, default=3.0, help="most seconds of timed calls per point")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in this process (replicas use 1, as in the cluster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--roundtrip", action="store_true",
                   help="also time the bare hop: transport.run with all T tokens to every shard and "
                        "every slot the no-expert sentinel, so shards compute nothing (roundtrip_p50/p90_ms)")
    return p.parse_args(argv)


def _inputs(cfg: MoEConfig, T: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed + T)
    x_TD = torch.randn(T, cfg.hidden_size, generator=g).to(dtype)
    logits_TE = torch.randn(T, cfg.num_experts, generator=g)
    w_TK, ids_TK = torch.topk(torch.softmax(logits_TE, dim=-1), cfg.top_k, dim=-1)
    return x_TD, ids_TK, (w_TK / w_TK.sum(-1, keepdim=True)).to(dtype)


class Timed:
    """Wraps a transport; remembers how long its last `run` (the shard calls) took."""

    def __init__(self, inner):
        self.inner, self.name, self.last_s = inner, inner.name, 0.0

    def run(self, layer, calls):
        t0 = time.perf_counter()
        out = self.inner.run(layer, calls)
        self.last_s = time.perf_counter() - t0
        return out


def _time(fn, iters: int, warmup: int, budget_s: float, side=None) -> tuple[list[float], list[float]]:
    """Up to `iters` timed calls (at least 5, at most ~budget_s seconds); with `side`, also
    side() read right after each call (paired samples)."""
    for _ in range(warmup):
        fn()
    out, paired = [], []
    stop = time.perf_counter() + budget_s
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if side is not None:
            paired.append(side())
        if i >= 4 and time.perf_counter() > stop:
            break
    return out, paired


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


class ServeCluster:
    """A local Ray cluster (--nodes nodes) with Serve and no HTTP proxy; torn down on close."""

    def __init__(self, nodes: int):
        import contextlib

        from ray import serve

        from serving.local_ray import local_ray_cluster
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(local_ray_cluster(nodes))
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        self.nodes = nodes
        self.apps: list[str] = []

    def deploy_shards(self, checkpoint: str, placement: Placement, dtype: str) -> list:
        from ray import serve

        from serving.deployments.expert_shard import ExpertShard
        self.clear()
        handles = []
        for s, resources in enumerate(_shard_resources(placement, self.nodes)):
            app = f"dispatch_bench_shard{s}"
            dep = ExpertShard.options(name=f"ExpertShard{s}", ray_actor_options={
                "num_cpus": 0.1, "resources": resources})
            handles.append(serve.run(dep.bind(checkpoint, placement.to_json(), s, dtype),
                                     name=app, route_prefix=None))
            self.apps.append(app)
        return handles

    def clear(self) -> None:
        from ray import serve
        for app in self.apps:
            serve.delete(app)
        self.apps = []

    def close(self) -> None:
        from ray import serve
        try:
            serve.shutdown()
        finally:
            self._stack.close()


def _roundtrip(transport, args, S: int, x, w, E: int) -> dict:
    """transport.run of all T tokens to each of the S shards, every slot the sentinel E (no
    shard holds it): real payload sizes, zero expert compute, so this times the hop alone."""
    calls = [ShardCall(s, x, torch.full(w.shape, E, dtype=torch.int64), w) for s in range(S)]
    with torch.inference_mode():
        rt, _ = _time(lambda: transport.run(args.layer, calls), args.iters, args.warmup, args.budget_s)
    return {"roundtrip_p50_ms": _pct(rt, 50) * 1e3, "roundtrip_p90_ms": _pct(rt, 90) * 1e3}


def _shard_resources(placement: Placement, nodes: int) -> list[dict[str, float]]:
    """Shard s on node s mod N, as `moe-serve up` places them."""
    from serving.deployments.config import node_resource
    return [{node_resource(s % nodes): 0.001} for s in range(placement.num_shards)]


def _collective_transport(ckpt: str, placement: Placement, dtype: torch.dtype, nodes: int,
                          local_shards: tuple[int, ...] = ()):
    """S shard actors in one gloo group with this driver; the shards in `local_shards` computed by
    this process instead."""
    from serving.parallel.collective_transport import CollectiveTransport
    return CollectiveTransport(ckpt, placement, dtype, shard_resources=_shard_resources(placement, nodes),
                               local_shards=local_shards, local_threads=torch.get_num_threads())


def _compiled_transport(ckpt: str, placement: Placement, dtype: torch.dtype, nodes: int):
    """S shard actors behind one Ray Compiled Graph."""
    from serving.parallel.compiled_graph_transport import CompiledGraphTransport
    return CompiledGraphTransport(ckpt, placement, dtype, _shard_resources(placement, nodes))


# transports built once per shard count on the local Ray cluster, and closed after it
GANGS = {"collective": _collective_transport,
         "collective-engine": lambda ckpt, placement, dtype, nodes: _collective_transport(
             ckpt, placement, dtype, nodes, (0,)),
         "compiled": _compiled_transport}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        print(f"error: unknown transports {sorted(unknown)} (known: {', '.join(TRANSPORTS)})", file=sys.stderr)
        return 2
    tmp_ckpt = None
    ckpt = args.checkpoint
    if ckpt is None:
        from serving.model.checkpoint import write_checkpoint
        tmp_ckpt = tempfile.mkdtemp(prefix="dispatch_bench_ckpt_")
        ckpt = str(write_checkpoint("mixtral", "small", tmp_ckpt))
    cfg = MoEConfig.from_dir(ckpt)
    header = {"command": command_line(), "machine": machine_info(), "checkpoint": ckpt,
              "shape": {"hidden": cfg.hidden_size, "experts": cfg.num_experts, "top_k": cfg.top_k,
                        "intermediate": cfg.moe_intermediate_size},
              "dtype": args.dtype, "layer": args.layer, "nodes": args.nodes,
              "placement": args.placement}
    print(f"command  {header['command']}\nmachine  {header['machine']['cpu_model']}, "
          f"{header['machine'].get('cores_available', header['machine']['cpu_count'])} cores, "
          f"torch {torch.__version__} ({args.threads} thread(s) in the driver)", flush=True)

    rows: list[dict] = []
    cluster = None
    t_start = time.perf_counter()
    try:
        for S in args.shards:
            placement = Placement.build(cfg, S, args.placement)
            workers = [ExpertShardWorker.from_checkpoint(ckpt, placement, s, dtype) for s in range(S)]
            all_experts = {e: w for wk in workers for e, w in wk.experts[args.layer].items()}
            built = {"local": lambda: LocalTransport(workers)}
            if "serve" in transports:
                if cluster is None:
                    cluster = ServeCluster(args.nodes)
                from serving.parallel.serve_transport import ServeTransport
                handles = cluster.deploy_shards(ckpt, placement, args.dtype)
                built["serve"] = lambda: ServeTransport(handles)
            gangs = []                         # GANGS transports to close after this S
            for name, make in GANGS.items():
                if name in transports:
                    if cluster is None:
                        cluster = ServeCluster(args.nodes)
                    gangs.append(make(ckpt, placement, dtype, args.nodes))
                    built[name] = lambda gang=gangs[-1]: gang
            for name in transports:
                transport = Timed(built[name]())
                dispatcher = ExpertDispatcher(placement, transport, cfg.num_experts)
                for T in args.tokens:
                    x, ids, w = _inputs(cfg, T, args.seed, dtype)
                    with torch.inference_mode():
                        compute, _ = _time(lambda: experts_forward(x, ids, w, all_experts),
                                           args.iters, args.warmup, args.budget_s)
                        total, in_transport = _time(lambda: dispatcher(args.layer, x, ids, w), args.iters,
                                                    args.warmup, args.budget_s, lambda: transport.last_s)
                    if name == "local":   # paired: the shard calls *are* the compute
                        overhead = [t - c for t, c in zip(total, in_transport)]
                    else:                 # the shards compute remotely: subtract local compute p50
                        overhead = [t - _pct(compute, 50) for t in total]
                    owner = placement.copy_table(args.layer)[0][ids, 0]   # primary copy
                    row = {"transport": name, "shards": S, "tokens": T,
                           "shards_called": int(sum(bool((owner == s).any()) for s in range(S))),
                           "iters": len(total),
                           "dispatch_p50_ms": _pct(total, 50) * 1e3,
                           "dispatch_p90_ms": _pct(total, 90) * 1e3,
                           "transport_p50_ms": _pct(in_transport, 50) * 1e3,
                           "compute_p50_ms": _pct(compute, 50) * 1e3,
                           "overhead_p50_ms": _pct(overhead, 50) * 1e3}
                    if args.roundtrip:
                        row.update(_roundtrip(transport.inner, args, S, x, w, cfg.num_experts))
                        print(f"  {name:<17} S={S} T={T:<4} bare hop p50 {row['roundtrip_p50_ms']:8.3f} ms  "
                              f"p90 {row['roundtrip_p90_ms']:8.3f} ms", flush=True)
                    rows.append(row)
                    print(f"  {name:<17} S={S} T={T:<4} dispatch p50 {row['dispatch_p50_ms']:8.3f} ms  "
                          f"compute p50 {row['compute_p50_ms']:7.3f} ms  overhead {row['overhead_p50_ms']:8.3f} ms",
                          flush=True)
            del workers, all_experts
            for gang in gangs:
                gang.close()
    finally:
        if cluster is not None:
            cluster.close()
        if tmp_ckpt:
            shutil.rmtree(tmp_ckpt, ignore_errors=True)

    print(f"\nper-MoE-layer dispatch + combine, {args.dtype}, hidden {cfg.hidden_size}, "
          f"{cfg.num_experts} experts top-{cfg.top_k}, ms. transport = time inside transport.run; "
          "overhead = dispatch - shard compute (local: paired per call; serve, collective*, compiled: minus the local compute p50)")
    print(f"{'transport':<18}{'shards':>7}{'tokens':>7}{'called':>7}{'dispatch p50':>14}"
          f"{'p90':>10}{'transport p50':>15}{'compute p50':>13}{'overhead p50':>14}")
    for r in rows:
        print(f"{r['transport']:<18}{r['shards']:>7}{r['tokens']:>7}{r['shards_called']:>7}"
              f"{r['dispatch_p50_ms']:>14.3f}{r['dispatch_p90_ms']:>10.3f}{r['transport_p50_ms']:>15.3f}"
              f"{r['compute_p50_ms']:>13.3f}{r['overhead_p50_ms']:>14.3f}")
    report = {**header, "wall_s": time.perf_counter() - t_start, "results": rows}
    print(json.dumps(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
