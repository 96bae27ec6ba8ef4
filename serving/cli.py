"""`moe-serve`: the command line.

  moe-serve checkpoint --family mixtral|qwen2_moe|qwen3_moe|deepseek_v3|hunyuan_v1_moe|olmoe|gpt_oss
                      --size tiny|small --out DIR [--weights float|fp8|mxfp4]
  moe-serve up --checkpoint DIR [--expert-shards S] [--nodes N] [--grpc-port P] [--metrics-port M]
  moe-serve redeploy [--checkpoint DIR] [--expert-shards S] [--transport T] [--dtype D]  (on the running cluster)
  moe-serve down | status
  moe-serve generate --target HOST:PORT (--prompt TEXT | --prompt-ids 1,2,3) [...]
  moe-serve run       (the demo behind `make run`: checkpoint if missing, up, stream, wait, down)
  moe-serve bench (--target HOST:PORT | --in-process --checkpoint DIR) --concurrency C --num-requests N --max-tokens T
  moe-serve loadtest --target HOST:PORT --profile spike --duration SECONDS --out DIR
  moe-serve simulate --trace spike|diurnal|poisson|FILE.csv --gpus 1000 [--json]
  moe-serve calibrate --out FILE
  moe-serve placement --checkpoint DIR --expert-shards S [--strategy load_aware] [--metrics-url URL]
  moe-serve manifest --checkpoint /models/DIR [--expert-shards S] [--nodes N] [--image IMG]  (KubeRay RayService)
  moe-serve token-hash < token    (sha256 for the Serve config's tenants.tokens)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO_CHECKPOINT = Path("checkpoints/demo-mixtral-small")
DEMO_PROMPT = "The night the promotion went live, the chat service"


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    from serving.launcher import DEFAULT_CONFIG, DEFAULT_STATE_DIR, GRPC_INGRESSES
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="HF-format checkpoint dir")
    p.add_argument("--expert-shards", type=int, default=2, help="S: ExpertShard deployments")
    p.add_argument("--nodes", type=int, default=2, help="local Ray nodes to start")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9464)
    p.add_argument("--transport", choices=["serve", "local", "collective"], default=None,
                   help="expert transport (default: the config file's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--grpc-ingress", choices=GRPC_INGRESSES, default="proxy",
                   help="what answers gRPC: Ray Serve's proxy actor, or HAProxy in front of replicas that "
                        "serve gRPC themselves (one hop fewer; serving/launcher.py GRPC_INGRESSES)")


def _up(a: argparse.Namespace) -> dict:
    from serving.launcher import up
    print(f"starting {a.nodes} local Ray node(s), {a.expert_shards} expert shard(s) "
          f"on {a.checkpoint} ...", flush=True)
    t0 = time.monotonic()
    state = up(checkpoint=a.checkpoint, expert_shards=a.expert_shards, nodes=a.nodes,
               grpc_port=a.grpc_port, metrics_port=a.metrics_port, config_path=a.config,
               state_dir=a.state_dir, transport=a.transport, dtype=a.dtype, grpc_ingress=a.grpc_ingress)
    print(f"ready in {time.monotonic() - t0:.0f}s\n"
          f"  gRPC endpoint : {state['grpc_target']}  (moe_serving.v1.MoEServing, KServe v2, grpc.health.v1.Health;"
          f" {state['grpc_ingress']})\n"
          f"  metrics       : {state['metrics_url']}\n"
          f"  stop with     : moe-serve down --state-dir {a.state_dir}", flush=True)
    return state


def cmd_up(a: argparse.Namespace) -> int:
    _up(a)
    return 0


def cmd_redeploy(a: argparse.Namespace) -> int:
    from serving.launcher import redeploy
    t0 = time.monotonic()
    state = redeploy(state_dir=a.state_dir, checkpoint=a.checkpoint, expert_shards=a.expert_shards,
                     transport=a.transport, dtype=a.dtype, config_path=a.config)
    print(f"redeployed in {time.monotonic() - t0:.1f}s: {state['checkpoint']}, "
          f"{state['expert_shards']} expert shard(s), transport {state['transport']}, "
          f"at {state['grpc_target']}", flush=True)
    return 0


def cmd_down(a: argparse.Namespace) -> int:
    from serving.launcher import down
    print("stopped" if down(state_dir=a.state_dir) else f"nothing running from {a.state_dir}")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from serving.launcher import pid_alive, read_state
    state = read_state(a.state_dir)
    if state and state.get("status") in ("starting", "ready") and not pid_alive(state["pid"]):
        state["status"] = "dead"
    print(json.dumps(state or {"status": "none"}, indent=2))
    return 0


def cmd_checkpoint(a: argparse.Namespace) -> int:
    from serving.model.checkpoint import write_checkpoint
    out = write_checkpoint(a.family, a.size, a.out, seed=a.seed, hot_experts=tuple(a.hot_experts),
                           hot_gain=a.hot_gain, weights=a.weights)
    print(f"wrote {a.family}/{a.size} checkpoint ({a.weights} weights) to {out}")
    return 0


def cmd_placement(a: argparse.Namespace) -> int:
    """Show a placement plan per layer and shard, and its predicted imbalance (max shard load / mean)."""
    import urllib.request
    from serving.metrics import observed_expert_load
    from serving.model.config import MoEConfig
    from serving.parallel.placement import Placement
    from serving.parallel.rebalance import step_imbalance
    state = None
    if a.apply:
        from serving.launcher import read_state
        state = read_state(a.state_dir)
        if not state or state.get("status") != "ready":
            raise RuntimeError(f"--apply: no ready cluster in {a.state_dir}")
        a.metrics_url = a.metrics_url or state["metrics_url"]
    config = MoEConfig.from_dir(a.checkpoint)
    load = {layer: [1.0] * config.num_experts for layer in config.moe_layer_ids}
    source = "uniform load (no --metrics-url)"
    if a.metrics_url:
        with urllib.request.urlopen(a.metrics_url, timeout=10) as r:
            observed = observed_expert_load(r.read().decode(), config.num_experts)
        if observed:
            load.update(observed)
            source = f"observed routed tokens from {a.metrics_url}"
    current = Placement.build(config, a.expert_shards, a.current)
    plan = Placement.build(config, a.expert_shards, a.strategy, load=load, redundant=a.redundant)
    before, after = current.predicted_imbalance(load), plan.predicted_imbalance(load)
    step = {"current": step_imbalance(current, load), "plan": step_imbalance(plan, load)}
    if state is not None:
        plan = _publish_placement(state, plan)
    if a.json:
        print(json.dumps({"strategy": a.strategy, "load_source": source, "placement": json.loads(plan.to_json()),
                          "predicted_imbalance": {str(k): v for k, v in after.items()},
                          "current_strategy": a.current,
                          "current_imbalance": {str(k): v for k, v in before.items()},
                          "predicted_step_imbalance": step}))
        return 0
    print(f"{a.strategy} placement over {a.expert_shards} shards; load: {source}")
    print(f"step imbalance (every layer waits for its busiest shard: sum of the busiest shards' tokens / "
          f"sum of the mean's): {a.current} {step['current']:.3f} -> {a.strategy} {step['plan']:.3f}")
    shard_load = plan.predicted_shard_load(load)
    for layer in plan.layers:
        print(f"layer {layer}: imbalance {a.current} {before[layer]:.3f} -> {a.strategy} {after[layer]:.3f}")
        for s, experts in sorted((s, plan.experts_of(s)[layer]) for s in range(plan.num_shards)):
            marks = [f"{e}{'*' if len(plan.copies[layer][e]) > 1 else ''}" for e in experts]
            print(f"  shard {s}: experts [{', '.join(marks)}]  predicted tokens {shard_load[layer][s]:.0f}")
    print("(* = a redundant expert: its tokens are spread over its copies)")
    if state is not None:
        print(f"applied as placement version {plan.version}: engines switch within ~1 s, "
              "shards load only the experts they newly serve")
    return 0


def _publish_placement(state: dict, plan):
    """Attach to the running cluster and publish `plan` (serving/deployments/placement_sync.py)."""
    os.environ["RAY_TMPDIR"] = state["ray_tmp"]
    import ray
    from serving.deployments.placement_sync import publish_placement
    ray.init(address=state["gcs_address"], logging_level="ERROR", log_to_driver=False)
    try:
        return publish_placement(plan)
    finally:
        ray.shutdown()


def cmd_generate(a: argparse.Namespace) -> int:
    from serving.client import run_generate
    return run_generate(a)


def cmd_tokenize(a: argparse.Namespace) -> int:
    from serving.client import run_tokenize
    return run_tokenize(a)


def cmd_manifest(a: argparse.Namespace) -> int:
    """Print (or write) a KubeRay RayService for the Serve config with these flags (serving/kuberay.py)."""
    from serving.kuberay import SERVE_HTTP_PORT, rayservice_manifest, render
    from serving.launcher import resolve_serve_config
    if a.nodes < 1 or a.expert_shards < 1:
        raise ValueError("--nodes and --expert-shards must be >= 1")
    if not a.checkpoint.startswith("/"):
        raise ValueError(f"--checkpoint is a path inside the pods and must be absolute, got {a.checkpoint!r}")
    cfg = resolve_serve_config(a.config, checkpoint=a.checkpoint, expert_shards=a.expert_shards, nodes=a.nodes,
                               grpc_port=a.grpc_port, metrics_port=a.metrics_port, http_port=SERVE_HTTP_PORT,
                               transport=a.transport, dtype=a.dtype, grpc_ingress=a.grpc_ingress)
    manifest = rayservice_manifest(cfg, name=a.name, image=a.image, checkpoint_claim=a.checkpoint_claim,
                                   head_cpu=a.head_cpu, head_memory=a.head_memory,
                                   worker_cpu=a.worker_cpu, worker_memory=a.worker_memory,
                                   grpc_ingress=a.grpc_ingress)
    flags = [f"--checkpoint {a.checkpoint}", f"--expert-shards {a.expert_shards}", f"--nodes {a.nodes}"]
    if a.grpc_ingress != "proxy":
        flags.append(f"--grpc-ingress {a.grpc_ingress}")
    text = render(manifest, "moe-serve manifest " + " ".join(flags))
    if a.out:
        Path(a.out).write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_token_hash(a: argparse.Namespace) -> int:
    """sha256 of a bearer token read from stdin (one line), for the Serve config's `tenants.tokens`."""
    from serving.api.tenants import token_sha256
    token = sys.stdin.readline().strip()
    if not token:
        print("error: no token on stdin (echo -n \"$TOKEN\" | moe-serve token-hash)", file=sys.stderr)
        return 2
    print(token_sha256(token))
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    """The `make run` demo: a 2-node cluster on the demo checkpoint, one streamed completion.
    Ctrl-C or SIGTERM (a supervisor, `kill`) stops the cluster it started, at any point."""
    from serving.api.protos import pb2
    from serving.client import MoEClient, build_request
    from serving.launcher import down
    if not (Path(a.checkpoint) / "config.json").exists():
        from serving.model.checkpoint import write_checkpoint
        print(f"writing demo checkpoint (mixtral, small) to {a.checkpoint} ...", flush=True)
        write_checkpoint("mixtral", "small", a.checkpoint, seed=0)

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        state = _up(a)
        print(f"\n> {DEMO_PROMPT}", flush=True)
        with MoEClient(state["grpc_target"]) as client:
            for chunk in client.generate(build_request(DEMO_PROMPT, max_tokens=a.max_tokens,
                                                       temperature=0.8, seed=0)):
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason:
                    reason = pb2.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower()
                    print(f"\n[finish_reason={reason} usage: prompt={chunk.usage.prompt_tokens} "
                          f"completion={chunk.usage.completion_tokens}]", flush=True)
        if a.exit_after_demo:
            return 0
        print("\ncluster is up; try:\n"
              f"  moe-serve generate --target {state['grpc_target']} --prompt 'Hello' --stream\n"
              f"  a KServe v2 / Triton client at {state['grpc_target']}, model {Path(a.checkpoint).name!r}\n"
              f"  curl -s {state['metrics_url']} | grep moe_serve_\n"
              "Ctrl-C stops everything.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)      # a second SIGTERM must not cut `down` short
        down(state_dir=a.state_dir)


def main(argv: list[str] | None = None) -> int:
    from serving.client import add_generate_arguments, add_tokenize_arguments
    from serving.model.config import SUPPORTED_FAMILIES    # torch-free: every command starts fast
    parser = argparse.ArgumentParser(prog="moe-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("checkpoint", help="write a seeded random HF-format checkpoint")
    p.add_argument("--family", choices=SUPPORTED_FAMILIES, required=True)
    p.add_argument("--size", choices=["tiny", "small"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hot-experts", type=int, nargs="*", default=[],
                   help="experts the router favours (their router rows x --hot-gain): a skewed load")
    p.add_argument("--hot-gain", type=float, default=4.0)
    p.add_argument("--weights", choices=["float", "fp8", "mxfp4"], default="float",
                   help="fp8: the projections in block-wise FP8 with 128x128 scales, as DeepSeek-V3 ships; "
                        "mxfp4 (gpt_oss): the experts in MXFP4, as gpt-oss ships")
    p.set_defaults(fn=cmd_checkpoint)

    p = sub.add_parser("up", help="start a local multi-node cluster serving a checkpoint")
    _add_cluster_args(p)
    p.set_defaults(fn=cmd_up)

    p = sub.add_parser("run", help="demo: up, stream one completion, wait for Ctrl-C, down")
    _add_cluster_args(p)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--exit-after-demo", action="store_true", help="stop right after the demo")
    p.set_defaults(fn=cmd_run)

    from serving.launcher import DEFAULT_STATE_DIR
    p = sub.add_parser("redeploy", help="serve another checkpoint / shard count on the running cluster, "
                                         "without restarting Ray")
    p.add_argument("--checkpoint", default=None, help="HF-format checkpoint dir (default: the deployed one)")
    p.add_argument("--expert-shards", type=int, default=None, help="S (default: the deployed count)")
    p.add_argument("--transport", choices=["serve", "local", "collective"], default=None,
                   help="expert transport (default: the deployed one)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="(default: the deployed one)")
    p.add_argument("--config", type=Path, default=None, help="Serve config file (default: the one `up` used)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.set_defaults(fn=cmd_redeploy)

    for name, fn, help_ in (("down", cmd_down, "stop what `up` started"),
                            ("status", cmd_status, "show the cluster `up` started")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
        p.set_defaults(fn=fn)

    p = sub.add_parser("placement", help="show an expert placement plan and its predicted imbalance")
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--expert-shards", type=int, default=2)
    p.add_argument("--strategy", choices=["contiguous", "round_robin", "load_aware"], default="load_aware")
    p.add_argument("--current", choices=["contiguous", "round_robin"], default="contiguous",
                   help="the strategy deployed now, to compare against")
    p.add_argument("--redundant", type=int, default=None, help="extra expert copies per layer (load_aware)")
    p.add_argument("--metrics-url", default=None, help="read observed tokens per expert from here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--apply", action="store_true", help="rebalance the running cluster to this plan, live")
    p.add_argument("--state-dir", type=Path, default=Path(".moe-serve"), help="with --apply: the cluster `up` started")
    p.set_defaults(fn=cmd_placement)

    from serving.loadgen import add_bench_arguments, add_loadtest_arguments, run_bench, run_loadtest
    p = sub.add_parser("bench", help="load generator over gRPC, or the engine in-process")
    add_bench_arguments(p)
    p.set_defaults(fn=run_bench)
    p = sub.add_parser("loadtest", help="rehearse a traffic profile (spike, ramp, diurnal, poisson)")
    add_loadtest_arguments(p)
    p.set_defaults(fn=run_loadtest)

    from serving.autoscaling.calibration import add_calibrate_arguments, run_calibrate
    from serving.autoscaling.simulator import add_simulate_arguments, run_simulate
    p = sub.add_parser("simulate", help="fleet simulation: our autoscaling policy vs Ray Serve's default")
    add_simulate_arguments(p)
    p.set_defaults(fn=run_simulate)
    p = sub.add_parser("calibrate", help="measure engine step and replica start times for the simulator")
    add_calibrate_arguments(p)
    p.set_defaults(fn=run_calibrate)

    p = sub.add_parser("generate", help="send one request to a running cluster")
    add_generate_arguments(p)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("tokenize", help="the token ids a running cluster would run for a prompt (no generation)")
    add_tokenize_arguments(p)
    p.set_defaults(fn=cmd_tokenize)

    from serving.kuberay import GRPC_PORT, METRICS_PORT
    from serving.launcher import DEFAULT_CONFIG, GRPC_INGRESSES
    p = sub.add_parser("manifest", help="a KubeRay RayService for the app (serving/kuberay.py)")
    p.add_argument("--checkpoint", required=True, help="the checkpoint dir inside the pods (absolute; its "
                                                        "parent is where the checkpoint volume is mounted)")
    p.add_argument("--expert-shards", type=int, default=2)
    p.add_argument("--nodes", type=int, default=2, help="Ray nodes: the head pod and nodes-1 expert worker pods")
    p.add_argument("--transport", choices=["serve", "local", "collective"], default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file")
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    p.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    p.add_argument("--name", default="moe-serve")
    p.add_argument("--image", default="moe-serving:latest", help="built from cluster/Dockerfile")
    p.add_argument("--checkpoint-claim", default="moe-checkpoints", help="PersistentVolumeClaim holding the checkpoints")
    p.add_argument("--head-cpu", default="8")
    p.add_argument("--head-memory", default="32Gi")
    p.add_argument("--worker-cpu", default="8")
    p.add_argument("--worker-memory", default="32Gi")
    p.add_argument("--grpc-ingress", choices=GRPC_INGRESSES, default="proxy",
                   help="what answers gRPC on the head (as `moe-serve up --grpc-ingress`)")
    p.add_argument("--out", default=None, help="write here instead of stdout")
    p.set_defaults(fn=cmd_manifest)

    p = sub.add_parser("token-hash", help="sha256 of a bearer token read from stdin, for the Serve "
                                          "config's tenants.tokens (serving/api/tenants.py)")
    p.set_defaults(fn=cmd_token_hash)

    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except (RuntimeError, TimeoutError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
