"""AppConfig: the typed, frozen arguments of the Serve application (the `args:` of the
application in the Serve config file under cluster/)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from serving.api.tenants import TenantsConfig
from serving.engine.speculative import SpeculativeConfig
from serving.parallel.rebalance import RebalancePolicy

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
TRANSPORTS = ("serve", "local", "collective")
INGRESSES = ("engine", "deployment")
NODE_PIN = 0.001     # a sliver of a node's custom resource: pins a replica or actor without limiting count


@dataclass(frozen=True, kw_only=True, slots=True)
class AppConfig:
    checkpoint: str                       # HF-format checkpoint directory
    served_model_name: str | None = None  # the model's name in the KServe v2 API (serving/api/kserve.py);
                                          # None: the checkpoint directory's name
    expert_shards: int = 2                # S: ExpertShard deployments
    nodes: int = 1                        # Ray nodes carrying a `moe_node_<i>` resource
    placement: str = "contiguous"         # contiguous | round_robin | load_aware (uniform load at deploy)
    transport: str = "serve"              # serve (ExpertShard deployments) | local (in the engine)
                                          # | collective (shard actors in one gloo group with the engine)
    ingress: str = "engine"               # which deployment Serve's gRPC proxy calls: engine (the
                                          # EngineReplica, one streaming hop) | deployment (an Ingress
                                          # deployment in front of it: two hops, scales on its own)
    dtype: str = "fp32"
    max_num_seqs: int = 16                # KV slots per engine replica
    max_model_len: int = 1024            # clamped to the model's max_position_embeddings
    max_num_batched_tokens: int = 2048    # tokens per engine step; longer prompts are prefilled in chunks
    kv_block_size: int = 16               # tokens per paged KV-cache block
    kv_cache_tokens: int = 0              # KV-cache size in tokens (0 = max_num_seqs x model len: never preempts)
    priority_preemption: bool = True      # a waiting interactive request takes a running batch one's slot
    prefix_caching: bool = True           # a request reuses the cached K/V of the whole KV blocks its tokens
                                          # share with earlier ones of its tenant (system prompt, earlier turns)
    speculative_tokens: int = 0           # n-gram drafts per sequence and step (serving/engine/
                                          # speculative.py; 0 = off) ...
    speculative_max_seqs: int = 4         # ... while at most this many sequences run
    ping_pong: bool = True                # two micro-batches per step: attention overlaps the expert calls
                                          # (serve and collective transports; nothing to overlap with local)
    stream_chunk_tokens: int = 1          # tokens per streamed message (engine -> [ingress ->] client) once
    stream_chunk_min_running: int = 16    # ... this many sequences run; below it every token is its own
                                          # message. The first token always goes alone (TTFT). 1 = off.
    stream_max_hold_s: float = 0.25       # no token is held back longer than this (+ one engine step)
    max_tokens_limit: int = 1024          # largest max_tokens a request may ask for
    max_queued: int = 32                  # admission: requests waiting for a KV slot, per engine replica
    token_budget: int = 0                 # admission: prompt+max_tokens reserved per replica (0 = slots x model len)
    batch_share: float = 0.5              # admission: share of queue and budget `batch` may use
    ttft_slo_s: float = 2.0               # admission: shed interactive whose predicted wait exceeds this
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"
    report_interval_s: float = 0.5        # how often replicas push metrics to the hub
    engine_process: bool | None = None    # the engine core (step loop, transport) in a process of its
                                          # own beside the replica, apart from Serve's threads and the GIL
                                          # they hold (serving/deployments/engine_core.py); False: a thread
                                          # of the replica; None: a process with the collective transport
    engine_threads: int = 1               # torch threads of an engine replica (attention, router, lm_head;
                                          # the experts' own threads are the shards')
    head_threads: int | None = None       # torch threads for the lm_head alone, which runs when the shards
                                          # are idle (serving/engine/torch_threads.py); None: engine_threads
    wide_step_tokens: int = 256           # ... and for whole steps of at least this many tokens (prefill)
    compute_nice: int | None = 5          # niceness of the engine's step loop and the collective shards'
                                          # serving threads (Ray workers run at 15; needs CAP_SYS_NICE,
                                          # else unchanged; None: leave them). See serving/thread_priority.py
    ingress_num_cpus: float = 0.1         # ingress `deployment` only
    engine_num_cpus: float = 0.25
    shard_num_cpus: float = 0.1
    collective_timeout_s: float = 60.0    # collective: one MoE layer's round trip, at most
    engine_expert_shard: bool = True      # collective: the engine's own process computes shard 0 (whose node
                                          # it shares) on its step thread while the other shards' actors
                                          # compute theirs: an EP rank itself, as in vLLM's and DeepSpeed's EP
    tenants: TenantsConfig | None = None  # bearer-token auth and per-tenant quotas on each replica serving
                                          # the API (serving/api/tenants.py); None: every caller is "default"
    auto_rebalance: RebalancePolicy | None = None   # automatic expert rebalancing (EPLB) by the MetricsHub
                                          # from the routed load (serving/parallel/rebalance.py); None: off

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.ingress not in INGRESSES:
            raise ValueError(f"ingress must be one of {INGRESSES}, got {self.ingress!r}")
        if self.expert_shards < 1 or self.nodes < 1 or self.engine_threads < 1:
            raise ValueError("expert_shards, nodes and engine_threads must be >= 1")
        if self.head_threads is not None and self.head_threads < 1:
            raise ValueError(f"head_threads must be None or >= 1, got {self.head_threads}")
        SpeculativeConfig(num_tokens=self.speculative_tokens, max_seqs=self.speculative_max_seqs)   # validates
        if self.wide_step_tokens < 1:
            raise ValueError(f"wide_step_tokens must be >= 1, got {self.wide_step_tokens}")
        if self.compute_nice is not None and not -20 <= self.compute_nice <= 19:
            raise ValueError(f"compute_nice must be None or in -20..19, got {self.compute_nice}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name must be None or a non-empty name")
        if self.tenants is not None and not isinstance(self.tenants, TenantsConfig):
            raise ValueError(f"tenants must be a mapping (serving/api/tenants.py), got {self.tenants!r}")
        if self.auto_rebalance is not None and not isinstance(self.auto_rebalance, RebalancePolicy):
            raise ValueError(f"auto_rebalance must be a mapping (serving/parallel/rebalance.py), got {self.auto_rebalance!r}")
        if self.auto_rebalance is not None and (self.transport == "local" or self.expert_shards < 2):
            raise ValueError("auto_rebalance needs expert shards to balance: transport serve or collective, "
                             f"expert_shards >= 2 (got {self.transport}, {self.expert_shards})")
        if self.stream_chunk_tokens < 1 or self.stream_chunk_min_running < 0 or self.stream_max_hold_s < 0:
            raise ValueError("stream_chunk_tokens must be >= 1, stream_chunk_min_running and "
                             "stream_max_hold_s >= 0")

    @property
    def model_name(self) -> str:
        """The served model's name: served_model_name, else the checkpoint directory's name."""
        return self.served_model_name or Path(os.path.abspath(self.checkpoint)).name

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_args(cls, args: dict) -> "AppConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown application args {unknown}; known: {sorted(known)}")
        if isinstance(args.get("tenants"), dict):
            args = {**args, "tenants": TenantsConfig.from_dict(args["tenants"])}
        if isinstance(args.get("auto_rebalance"), dict):
            args = {**args, "auto_rebalance": RebalancePolicy.from_dict(args["auto_rebalance"])}
        return cls(**args)

    @property
    def engine_core_process(self) -> bool:
        """Whether the engine core runs in a process of its own. By default only with `collective`,
        whose step loop then has that process to itself; with `serve` the shard handles' threads
        run there too, and on 2 cores it measured ~8% slower than a thread of the replica."""
        return self.engine_process if self.engine_process is not None else self.transport == "collective"

    def model_len(self, max_position_embeddings: int) -> int:
        """The context length actually served: this config's cap, within the model's."""
        return min(self.max_model_len, max_position_embeddings)

    def to_args(self) -> dict:
        """The args dict `from_args` reads back (what the Serve config's `args:` holds)."""
        args = asdict(self)
        args["tenants"] = self.tenants.to_dict() if self.tenants is not None else None
        return args


def node_resource(node_index: int) -> str:
    """The custom resource that pins a replica to local Ray node `node_index`."""
    return f"moe_node_{node_index}"
