"""EngineReplica deployment: a shim around the engine core (serving/deployments/engine_core.py).

The core holds everything but the routed experts (embeddings, attention, norms, router,
lm_head, KV cache) and reaches the experts through the ExpertDispatcher; it runs in a process
of its own beside the replica (AppConfig.engine_process), or on a thread of the replica. The
replica admits, sheds, chunks the streams and reports metrics. With AppConfig.ingress = "engine"
it is also the app's ingress: Serve's gRPC proxy calls its GrpcFace methods, which stream from
`generate` in-process.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import AsyncIterator

from serving.api import log_filters
from serving.deployments import startup_priority

startup_priority.boost()   # before torch: a replica starting mid-spike imports ahead of the busy ones

import ray  # noqa: E402
from ray import serve

from serving.deployments.config import NODE_PIN, AppConfig, node_resource
from serving.deployments.engine_core import LocalCore, RemoteCore
from serving.deployments.grpc_face import GrpcFace
from serving.deployments.placement_sync import PlacementWatcher
from serving.deployments.reporter import MetricsReporter
from serving.engine.admission import AdmissionConfig, AdmissionController
from serving.engine.load_window import LoadWindow
from serving.autoscaling.signals import engine_autoscaling_stats
from serving.engine.engine import Engine
from serving.engine.host_allocator import tune_host_allocator
from serving.engine.request import GenerationRequest, TokenEvent
from serving.engine.scheduler import SchedulerConfig
from serving.engine.speculative import SpeculativeConfig
from serving.engine.torch_threads import StepThreads, WithThreads
from serving.metrics import EngineSample
from serving.model.config import MoEConfig
from serving.model.model import MoEModel
from serving.model.tokenizer import Tokenizer
from serving.parallel.collective_transport import CollectiveGroupError, CollectiveTransport
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement
from serving.parallel.serve_transport import ServeTransport


# A shard replica restarting or moving: the step is retried until Serve has it back.
# A broken collective group: the next step rebuilds it (new shard actors, a new gloo group).
SHARD_UNREACHABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                     serve.exceptions.DeploymentUnavailableError, serve.exceptions.ReplicaUnavailableError,
                     CollectiveGroupError)


def build_engine(cfg: AppConfig, placement: Placement, shard_handles=None) -> tuple[Engine, ExpertDispatcher]:
    """The plain engine for `cfg`: experts in-process (`local`), behind Serve handles (`serve`),
    or in shard actors this engine starts and owns (`collective`; shard s on node s mod nodes; with
    `engine_expert_shard`, shard 0 in this process instead)."""
    tune_host_allocator()       # this process serves: keep step-sized blocks (host_allocator.py)
    model = MoEModel.from_checkpoint(cfg.checkpoint, dtype=cfg.torch_dtype)
    step_threads = None
    if cfg.head_threads is not None and cfg.head_threads != cfg.engine_threads:
        model.lm_head = WithThreads(model.lm_head, cfg.head_threads)   # the shards are idle by then
        step_threads = StepThreads(cfg.engine_threads, cfg.head_threads, cfg.wide_step_tokens)
    if cfg.transport == "serve":
        transport = ServeTransport(shard_handles)
    elif cfg.transport == "collective":
        transport = CollectiveTransport(
            cfg.checkpoint, placement, cfg.torch_dtype, num_cpus=cfg.shard_num_cpus,
            shard_resources=[{node_resource(s % cfg.nodes): NODE_PIN} for s in range(placement.num_shards)],
            timeout_s=cfg.collective_timeout_s, compute_nice=cfg.compute_nice, warm_rows=cfg.max_num_batched_tokens,
            local_shards=(0,) if cfg.engine_expert_shard and placement.num_shards > 1 else (),
            local_threads=cfg.engine_threads)
    else:
        transport = LocalTransport([ExpertShardWorker.from_checkpoint(cfg.checkpoint, placement, s, cfg.torch_dtype)
                                    for s in range(placement.num_shards)])
    dispatcher = ExpertDispatcher(placement, transport, model.config.num_experts)
    sched = SchedulerConfig(max_num_seqs=cfg.max_num_seqs,
                            max_model_len=cfg.model_len(model.config.max_position_embeddings),
                            max_num_batched_tokens=cfg.max_num_batched_tokens, block_size=cfg.kv_block_size,
                            num_kv_blocks=-(-cfg.kv_cache_tokens // cfg.kv_block_size) if cfg.kv_cache_tokens else None,
                            priority_preemption=cfg.priority_preemption, prefix_caching=cfg.prefix_caching)
    # the GEMM kernels of the dense part, and of the experts computed in this process (the shards in
    # other processes warm their own), built by the engine's first step (serving/model/linear.py)
    local_experts = getattr(transport, "warm_targets", None)
    warm = model.warm_targets(cfg.max_num_batched_tokens, cfg.max_num_seqs) + (
        local_experts(cfg.max_num_batched_tokens) if local_experts is not None else [])
    engine = Engine(model, dispatcher, Tokenizer.from_dir(cfg.checkpoint), sched, dtype=cfg.torch_dtype,
                    ping_pong=cfg.ping_pong, step_threads=step_threads, warm_targets=warm,
                    speculative=SpeculativeConfig(num_tokens=cfg.speculative_tokens,
                                                  max_seqs=cfg.speculative_max_seqs))
    return engine, dispatcher


class EngineSampler:
    """Turns the engine's running totals into per-report deltas (an EngineSample), counted
    from its creation (a warm-up before it is not reported)."""

    def __init__(self, engine: Engine, dispatcher: ExpertDispatcher, model: dict[str, str] | None = None):
        self.engine, self.dispatcher, self.model = engine, dispatcher, dict(model or {})
        s = engine.stats
        self._prompt, self._generated, self._steps = s.prompt_tokens_total, s.generated_tokens_total, s.steps_total
        self._preempted = s.preempted_total
        self._prefix = (s.prefix_query_tokens_total, s.prefix_hit_tokens_total)
        self._spec = (s.spec_draft_tokens_total, s.spec_accepted_tokens_total)
        self._phases = dict(s.phase_seconds_total)
        self._busy = dispatcher.shard_busy_seconds()

    def __call__(self) -> EngineSample:
        s = self.engine.stats
        steps = s.recent_step_seconds[-(s.steps_total - self._steps):] if s.steps_total > self._steps else []
        sample = EngineSample(
            num_waiting=s.num_waiting, num_running=s.num_running,
            kv_slots_used=s.kv_slots_used, kv_slots_total=s.kv_slots_total,
            kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
            preemptions=s.preempted_total - self._preempted,
            prompt_tokens=s.prompt_tokens_total - self._prompt,
            generated_tokens=s.generated_tokens_total - self._generated,
            prefix_query_tokens=s.prefix_query_tokens_total - self._prefix[0],
            prefix_hit_tokens=s.prefix_hit_tokens_total - self._prefix[1],
            spec_draft_tokens=s.spec_draft_tokens_total - self._spec[0],
            spec_accepted_tokens=s.spec_accepted_tokens_total - self._spec[1],
            step_seconds=list(steps), model=self.model,
            routed_tokens={(layer, e, shard): n
                           for layer, per_shard in self.dispatcher.take_routed_counts().items()
                           for shard, counts in enumerate(per_shard) for e, n in enumerate(counts) if n})
        phases, busy = dict(s.phase_seconds_total), self.dispatcher.shard_busy_seconds()
        sample.phase_seconds, sample.shard_busy_seconds = _growth(phases, self._phases), _growth(busy, self._busy)
        self._phases, self._busy = phases, busy
        self._prompt, self._generated, self._steps = s.prompt_tokens_total, s.generated_tokens_total, s.steps_total
        self._preempted = s.preempted_total
        self._prefix = (s.prefix_query_tokens_total, s.prefix_hit_tokens_total)
        self._spec = (s.spec_draft_tokens_total, s.spec_accepted_tokens_total)
        return sample


def model_labels(cfg: AppConfig, config: MoEConfig) -> dict[str, str]:
    """moe_serve_model_info's labels (serving/metrics.py MODEL_INFO_LABELS) for this replica."""
    q = config.quantization
    return {"model": Path(cfg.checkpoint).name, "family": config.family, "dtype": cfg.dtype,
            "weights": q.label if q is not None else "float", "expert_shards": str(cfg.expert_shards),
            "transport": cfg.transport}


def _growth(now: dict, before: dict) -> dict:
    """Per key, how much a running total grew since `before` (never negative)."""
    return {k: max(0.0, v - before.get(k, 0.0)) for k, v in now.items()}


class ReplicaEngineClient:
    """EngineClient over the replica's own `generate` (no Ray hop): the gRPC face's engine."""

    def __init__(self, replica: "EngineReplica"):
        self.replica = replica

    def stream(self, request: GenerationRequest) -> AsyncIterator[list[TokenEvent]]:
        return self.replica.generate(request)


@serve.deployment
class EngineReplica(GrpcFace):
    async def __init__(self, args: dict, placement_json: str, shard_handles: list, metrics_hub):
        """Build the engine core (serving/deployments/engine_core.py), then warm it up before
        Serve routes any request here."""
        log_filters.install()                    # no traceback per shed / invalid request
        cfg = AppConfig.from_args(args)
        if cfg.engine_core_process:
            self.core = await RemoteCore.start(cfg, placement_json, shard_handles)
        else:
            self.core = LocalCore(cfg, placement_json, shard_handles)
            await asyncio.to_thread(self.core.warm_up)
        info = await self.core.describe_async()
        self._setup(cfg, info)
        replica = serve.get_replica_context().replica_id.unique_id
        self.reporter = MetricsReporter(metrics_hub, f"engine-{replica}", cfg.report_interval_s,
                                        collect_engine=self.core.sample)
        model_cfg = MoEConfig.from_dir(cfg.checkpoint)
        self.setup_faces(cfg, model_cfg, Tokenizer.from_dir(cfg.checkpoint), ReplicaEngineClient(self),
                         self.reporter, ready=True)
        startup_priority.restore()               # ready: back to the workers' niceness
        self.core.set_step_nice(cfg.compute_nice)   # ... except the step loop

    def _setup(self, cfg: AppConfig, info: dict) -> None:
        self.admission = AdmissionController(AdmissionConfig(
            max_running=info["max_num_seqs"], max_queued=cfg.max_queued, batch_share=cfg.batch_share,
            max_wait_s=cfg.ttft_slo_s, prior_service_s=cfg.ttft_slo_s,
            token_budget=cfg.token_budget or info["kv_tokens"]),
            step_s=self._recent_step_s)
        self.load = LoadWindow()
        self.stream_max_hold_s = cfg.stream_max_hold_s
        self.chunk_tokens = lambda: (cfg.stream_chunk_tokens if self.core.num_running()
                                     >= cfg.stream_chunk_min_running else 1)
        self.placement_watcher = PlacementWatcher(lambda p: self.core.set_placement(p.to_json()))

    def _recent_step_s(self) -> float:
        """The median of the engine's last 9 step times (one long prefill step does not move it)."""
        recent = sorted(self.core.recent_step_seconds())
        return recent[len(recent) // 2] if recent else 0.0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[TokenEvent]]:
        """The request's TokenEvents in chunks (one streamed message each; see async_engine.chunked)."""
        self.load.add("arrivals")                # offered load, shed requests included
        self.admission.admit(request)            # raises Overloaded: shed before any work is done
        t0, first, generated = time.monotonic(), True, 0
        try:
            async for chunk in self.core.stream_chunks(request, self.chunk_tokens, self.stream_max_hold_s):
                if first:
                    self.load.add("ttft_s", time.monotonic() - t0)
                    self.admission.started(request.request_id)
                    first = False
                generated += sum(ev.token_id >= 0 for ev in chunk)
                yield chunk
        finally:
            self.admission.release(request.request_id, generated)
            self.load.add("completed")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-autoscaling hook: this replica's load (see serving/autoscaling/signals.py)."""
        return engine_autoscaling_stats(
            queue_depth=self.core.num_waiting(), running=self.core.num_running(),
            ttft_p90_s=self.load.quantile("ttft_s", 0.9), ttft_p99_s=self.load.quantile("ttft_s", 0.99),
            arrivals_per_s=self.load.rate("arrivals"), completed_per_s=self.load.rate("completed"))

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine core process died is replaced."""
        if not self.core.alive:
            raise RuntimeError("the engine core process is gone")

    async def ready(self) -> dict:
        info = await self.core.describe_async()
        return {"node_id": ray.get_runtime_context().get_node_id(),
                "transport": info["transport"], "placement_version": info["placement_version"],
                "step_loop_nice": info["step_loop_nice"],
                # scheduling policies (serving/thread_priority.py): the step loop, and its process
                "step_loop_policy": info["step_loop_policy"], "process_policy": info["core_process_policy"],
                "engine_process": info["core_pid"] != os.getpid(), "engine_core_pid": info["core_pid"],
                "kernel_warm_up": info["kernel_warm_up"]}      # GEMM kernels built at start (linear.py)

    async def describe_shards(self) -> list[dict]:
        """The collective transport's shard actors (shard id, node id, experts); [] otherwise."""
        return (await self.core.describe_async())["shards"]

    def __del__(self):
        if hasattr(self, "reporter"):
            self.reporter.stop()
        if hasattr(self, "core"):
            self.core.shutdown()
