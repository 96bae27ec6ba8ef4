"""The `collective` transport: expert shards are plain Ray actors that share one gloo process
group with the engine; tokens move over it point to point, with no Ray call per layer.

Ranks: 0 is the engine (the only producer), the shards in actors (`ExpertShardActor`) are ranks
1.. in shard order (shard s is rank s+1 when no shard is local, below). Ray only creates, places,
probes and kills the actors. The data path is torch.distributed.

The engine can be an expert-parallel rank itself (`local_shards`, as every rank of vLLM's or
DeepSpeed's EP holds experts): those shards live in the engine's process, as ExpertShardWorkers,
and the remote ones are ranks 1.. in order. A layer then posts the remote shards' messages,
computes the local shards' experts on the engine's own thread (`local_threads` torch threads)
while the remote ones compute theirs, and waits for the remote answers last. On the 2-core
machine that saves a message, a process and its wake-ups per layer for shard 0, whose node the
engine shares anyway (README "Peer benchmark").

For every MoE layer (`CollectiveTransport.run`), for every remote shard s that gets tokens:
  1. post irecv of y_ND from shard s's rank (bytes, in x's dtype)
  2. isend one message: header_H = [op, layer, N, D, K, dtype code] (int64[6]), then
     topk_ids_NK (int64) | topk_weights_NK (fp32) | x_ND (dtype), all as bytes
  3. shard s (a serving-loop thread in the actor) has already posted a recv for it into a
     reused INLINE_BYTES buffer. It runs ExpertShardWorker.forward, posts the recv for the
     next message, and sends y_ND back
  4. compute the local shards' calls, then wait for every send and every y_ND, all under one
     deadline (`timeout_s`)
A shard that gets no tokens this layer is not contacted at all. Both recvs are posted before
their data is sent, so gloo moves each message at once, with no rendezvous. A message larger
than INLINE_BYTES (a long prefill) goes as the header alone (op OP_FORWARD_SPLIT), then the
payload. That split costs one extra rendezvous, which is small next to that much compute.

The group is ours alone. It is built from its own TCPStore and ProcessGroupGloo, not through
`init_process_group`, so an engine process that already has a default group is untouched.
Gloo runs on CPU tensors. NCCL would need the experts on GPU, which this codebase does not
do yet.

Faults. A dead collective group cannot be repaired in place, so any failure breaks the group.
When a shard process dies, gloo sees the connection close within milliseconds. When a shard
hangs, or its node is cut off, the deadline expires. When a shard's forward raises, the shard
drops its side of the group, which the engine sees as a closed connection. In every case
`run` then:
  - probes each actor through Ray (is it alive? its last error),
  - drops the group and kills every shard actor,
  - raises `CollectiveGroupError` naming the shards at fault.
The next `run` rebuilds the whole gang (new actors, a new group on a fresh port), within
`connect_timeout_s`, and raises `CollectiveGroupError` again if it cannot. The AsyncEngine
lists this error as retryable, so a step is retried until the rebuild succeeds or its retry
budget runs out. This transport is not elastic: S is fixed, and there are no per-shard
replicas or autoscaling. Those live in the `serve` transport.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import threading
import time
from typing import Sequence

import ray
import torch
import torch.distributed as dist

from serving.deployments import startup_priority
from serving.engine.host_allocator import tune_host_allocator
from serving.engine.torch_threads import WithThreads, torch_threads
from serving.model.linear import WarmTarget, WarmUpReport, warm_up
from serving.parallel.dispatcher import ShardCall
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement
from serving.thread_priority import inherited_priority, thread_nice

log = logging.getLogger(__name__)

OP_STOP, OP_FORWARD, OP_FORWARD_SPLIT = 0, 1, 2
HEADER_LEN = 6                                   # op, layer, N, D, K, dtype code
HEADER_BYTES = HEADER_LEN * 8
INLINE_BYTES = 1 << 20                           # header + payload up to this go as one message
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODE_DTYPES = {c: d for d, c in DTYPE_CODES.items()}
TAG = 0                                          # one engine<->shard stream, FIFO per pair
FOREVER = datetime.timedelta(days=3650)          # a shard waits for the next layer indefinitely


class CollectiveGroupError(RuntimeError):
    """The collective group broke (a shard died, hung, or failed). The next run rebuilds it."""


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def _node_ip() -> str:
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _gloo_group(store: dist.Store, rank: int, world_size: int, host: str,
                timeout_s: float) -> dist.ProcessGroup:
    """A private gloo group (never the default one). It binds to this node's IP.
    `timeout_s` bounds only the rendezvous: every wait below passes its own timeout."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _td(timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


class ExpertShardActor:
    """One expert shard as a plain Ray actor (rank shard_id + 1), serving in a background thread."""

    def __init__(self, checkpoint: str, placement_json: str, shard_id: int, dtype: torch.dtype, warm_rows: int = 0):
        torch.set_num_threads(1)
        tune_host_allocator()
        self.worker = ExpertShardWorker.from_checkpoint(checkpoint, Placement.from_json(placement_json),
                                                        shard_id, dtype)
        # ready: back to the workers' niceness, as the replicas do. Before `start`, or its serving
        # thread would inherit the boost's nice 0, and the boost's timer would later put that thread
        # back to the workers' 15, behind Ray's streaming threads.
        startup_priority.restore()
        self._thread: threading.Thread | None = None
        self._pg = None
        self.error: str | None = None
        self.calls = self.tokens = 0
        self.forward_s = 0.0                  # wall time in ExpertShardWorker.forward (the rest is waiting)
        self.warm_rows = warm_rows            # the engine's tokens per step: the most rows an expert gets
        self.kernel_warm_up: WarmUpReport | None = None
        self._warmed = threading.Event()

    def describe(self) -> dict:
        return describe_worker(self.worker, in_engine=False)

    def start(self, rank: int, store_host: str, store_port: int, world_size: int, timeout_s: float,
              compute_nice: int | None = None) -> None:
        """Join the group as `rank` (blocks until every rank has joined), then serve in a thread. The
        serving thread and gloo's threads run at `compute_nice` (serving/thread_priority.py)."""
        with inherited_priority(compute_nice):
            store = dist.TCPStore(store_host, store_port, world_size, False, timeout=_td(timeout_s))
            self._pg = _gloo_group(store, rank, world_size, _node_ip(), timeout_s)
            self._thread = threading.Thread(target=self._serve, args=(timeout_s,),
                                            name=f"expert-shard-{self.worker.shard_id}", daemon=True)
            self._thread.start()
            self._warmed.wait(timeout_s)          # its kernels built: connected means ready to serve

    def retain(self, keep: dict[int, tuple[int, ...]]) -> None:
        """After a rebalance: drop the experts the new placement took away from this shard."""
        self.worker.retain(keep)

    def status(self) -> dict:
        alive = self._thread is not None and self._thread.is_alive()
        return {"serving": alive, "error": self.error, "calls": self.calls, "tokens": self.tokens,
                "forward_s": self.forward_s,
                "kernel_warm_up": dataclasses.asdict(self.kernel_warm_up) if self.kernel_warm_up else None,
                "nice": thread_nice(self._thread.native_id) if alive else None}

    def _serve(self, timeout_s: float) -> None:
        try:
            # the GEMM kernels, built on this thread (oneDNN keys a kernel by the OpenMP threads of the
            # calling thread) before the first call: the engine's warm-up request waits for it
            # (serving/model/linear.py)
            try:
                self.kernel_warm_up = warm_up(self.worker.warm_targets(self.warm_rows))
            finally:
                self._warmed.set()
            self._serve_loop(self._pg, _td(timeout_s))
        except Exception as exc:              # noqa: BLE001 -- reported through status()
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("expert shard %d stopped: %s", self.worker.shard_id, self.error)
        finally:
            self._pg = None                   # the last reference: closes our connections,
                                              # so the engine sees this shard gone at once

    def _serve_loop(self, pg, timeout: datetime.timedelta) -> None:
        inbox = torch.empty(INLINE_BYTES, dtype=torch.uint8)    # reused: every message lands here
        pending = pg.recv([inbox], 0, TAG)
        while True:
            pending.wait(FOREVER)
            op, layer, N, D, K, code = inbox[:HEADER_BYTES].view(torch.int64).tolist()
            if op == OP_STOP:
                return
            dtype = CODE_DTYPES[code]
            n_ids, n_w = N * K * 8, N * K * 4
            size = n_ids + n_w + N * D * dtype.itemsize
            if op == OP_FORWARD:
                payload = inbox[HEADER_BYTES:HEADER_BYTES + size]
            else:                                               # too big to inline: it follows
                payload = torch.empty(size, dtype=torch.uint8)
                pg.recv([payload], 0, TAG).wait(timeout)
            topk_ids_NK = payload[:n_ids].view(torch.int64).view(N, K)
            topk_weights_NK = payload[n_ids:n_ids + n_w].view(torch.float32).view(N, K)
            x_ND = payload[n_ids + n_w:].view(dtype).view(N, D)
            t0 = time.perf_counter()
            y_ND = self.worker.forward(layer, x_ND, topk_ids_NK, topk_weights_NK).to(dtype).contiguous()
            self.forward_s += time.perf_counter() - t0
            pending = pg.recv([inbox], 0, TAG)                  # x_ND is consumed: ready for the next
            pg.send([_as_bytes(y_ND)], 0, TAG).wait(timeout)
            self.calls += 1
            self.tokens += N


def describe_worker(worker: ExpertShardWorker, in_engine: bool) -> dict:
    """A shard as `shard_info` lists it: where it runs and which experts it holds."""
    return {"shard_id": worker.shard_id,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "pid": os.getpid(), "in_engine": in_engine, "experts": worker.expert_ids(),
            "num_parameters": worker.num_parameters()}


_RemoteShard = ray.remote(ExpertShardActor)


class CollectiveTransport:
    """Engine side (rank 0). It owns the shard actors: created here, killed by `close`."""
    name = "collective"

    def __init__(self, checkpoint: str, placement: Placement, dtype: torch.dtype = torch.float32, *,
                 shard_resources: Sequence[dict] | None = None, num_cpus: float = 0.1,
                 timeout_s: float = 60.0, connect_timeout_s: float = 180.0,
                 compute_nice: int | None = None, warm_rows: int = 0,
                 local_shards: Sequence[int] = (), local_threads: int = 1):
        self.checkpoint, self.placement, self.dtype = str(checkpoint), placement, dtype
        self.warm_rows = warm_rows              # the shards warm their kernels up to this many rows
        self.num_shards = placement.num_shards
        self.local_shards = tuple(sorted(set(local_shards)))      # computed in this process
        self.remote_shards = tuple(s for s in range(self.num_shards) if s not in self.local_shards)
        if not self.remote_shards or not set(self.local_shards) <= set(range(self.num_shards)):
            raise ValueError(f"local_shards {list(local_shards)} must be some, not all, of the "
                             f"{self.num_shards} shards (all local: the `local` transport)")
        self._rank = {s: i + 1 for i, s in enumerate(self.remote_shards)}   # remote shard -> its rank
        # the engine's own shards: their workers (this process's warm-up builds their kernels, on
        # `local_threads` threads as they run), and the seconds each spent computing
        self.workers = [ExpertShardWorker.from_checkpoint(checkpoint, placement, s, dtype) for s in self.local_shards]
        self._local = dict(zip(self.local_shards, self.workers))
        self.local_threads = local_threads
        self._local_busy_s = dict.fromkeys(self.local_shards, 0.0)
        # remote shard -> actor resources (`shard_resources` lists every shard; the local ones' are unused)
        self.shard_resources = list(shard_resources or [{}] * self.num_shards)
        self.num_cpus = num_cpus
        self.timeout_s = timeout_s              # one layer's round trip, worst case
        self.connect_timeout_s = connect_timeout_s
        self.compute_nice = compute_nice        # the shards' serving threads (thread_priority.py)
        self.generation = 0                     # groups built so far (1 + rebuilds)
        self.actors: list = []
        self.shard_info: list[dict] = []        # describe_worker() of each shard, at connect time
        self._pg = None
        self._closed = False
        self._lock = threading.Lock()
        # busy_seconds: per shard, the banked counts of earlier gangs and the last of this one
        self._busy_generation, self._busy_base, self._busy_last = 1, {}, {}
        self._connect()

    def warm_targets(self, max_rows: int) -> list[WarmTarget]:
        """The local shards' linears, as they are called: on `local_threads` threads."""
        return [WarmTarget(WithThreads(t.call, self.local_threads), t.linear, t.max_rows)
                for w in self.workers for t in w.warm_targets(max_rows)]

    # ---- the data path ----------------------------------------------------------------
    def run(self, layer: int, calls: Sequence[ShardCall]) -> list[torch.Tensor]:
        return self.submit(layer, calls).wait()

    def submit(self, layer: int, calls: Sequence[ShardCall]) -> "CollectivePending":
        """Post every send and receive of this layer and return; `wait` completes them. Two
        submits may be in flight (ping-pong micro-batches): a shard answers its messages in
        order, and gloo matches receives from one peer in the order they were posted."""
        with self._lock:
            if self._closed:
                raise CollectiveGroupError("the collective transport is closed")
            if self._pg is None:
                self._connect()               # the group broke earlier: rebuild the whole gang
            pg, deadline = self._pg, time.monotonic() + self.timeout_s
            out: list[torch.Tensor] = []
            pending = []                      # (shard, work, tensors the work reads or writes)
            local = []                        # (index in out, call): computed by `wait`
            shard = -1
            try:
                for c in calls:
                    N, D = c.x_ND.shape
                    y_ND = torch.empty(N, D, dtype=c.x_ND.dtype)
                    out.append(y_ND)
                    if N == 0:
                        continue
                    if c.shard in self._local:
                        local.append((len(out) - 1, c))
                        continue
                    shard, rank = c.shard, self._rank[c.shard]
                    pending.append((shard, pg.recv([_as_bytes(y_ND)], rank, TAG), None))          # 1
                    parts = [_as_bytes(c.topk_ids_NK.to(torch.int64)), _as_bytes(c.topk_weights_NK.float()),
                             _as_bytes(c.x_ND)]
                    inline = HEADER_BYTES + sum(p.numel() for p in parts) <= INLINE_BYTES
                    header_H = torch.tensor([OP_FORWARD if inline else OP_FORWARD_SPLIT, layer, N, D,
                                             c.topk_ids_NK.shape[1], DTYPE_CODES[c.x_ND.dtype]], dtype=torch.int64)
                    if inline:                                                                  # 2
                        msg = torch.cat([_as_bytes(header_H), *parts])
                        pending.append((shard, pg.send([msg], rank, TAG), msg))
                    else:
                        payload = torch.cat(parts)
                        pending.append((shard, pg.send([header_H], rank, TAG), header_H))
                        pending.append((shard, pg.send([payload], rank, TAG), payload))
            except RuntimeError as exc:       # gloo: a peer closed its connection
                pending.clear()
                raise self._broken(shard, exc) from exc
            return CollectivePending(self, out, pending, deadline, local, layer)

    def busy_seconds(self, timeout_s: float = 1.0) -> dict[int, float]:
        """shard -> seconds its serving threads have spent in ExpertShardWorker.forward, over every
        gang this transport has built: what the actors of earlier generations had reported when last
        asked, plus the current actors' counts. Asks each actor through Ray (one call per shard, from
        the metrics reporter), so not for the data path; shards that do not answer within `timeout_s`
        keep their last answer."""
        if self.generation != self._busy_generation:     # a rebuild: bank what the old gang did
            for s, v in self._busy_last.items():
                self._busy_base[s] = self._busy_base.get(s, 0.0) + v
            self._busy_generation, self._busy_last = self.generation, {}
        for s, st in zip(self.remote_shards, self._probe(timeout_s)):
            if isinstance(st, dict):
                self._busy_last[s] = st["forward_s"]
        shards = set(self._busy_base) | set(self._busy_last)
        busy = {s: self._busy_base.get(s, 0.0) + self._busy_last.get(s, 0.0) for s in shards}
        return dict(sorted({**busy, **self._local_busy_s}.items()))

    def _compute_local(self, layer: int, c: ShardCall) -> torch.Tensor:
        """One local shard's call, on the engine's thread with `local_threads` torch threads."""
        t0 = time.perf_counter()
        try:
            with torch_threads(self.local_threads):
                return self._local[c.shard].forward(layer, c.x_ND, c.topk_ids_NK, c.topk_weights_NK)
        finally:
            self._local_busy_s[c.shard] += time.perf_counter() - t0

    def _failed(self, shard: int, exc: BaseException) -> CollectiveGroupError:
        with self._lock:
            return self._broken(shard, exc)

    def set_placement(self, placement: Placement, retain_after_s: float = 5.0) -> None:
        """A live rebalance. Shards load newly routed experts on first use (ExpertShardWorker),
        and drop the ones taken away once `retain_after_s` has passed. A rebuild loads `placement`."""
        self.placement = placement

        def retain() -> None:
            for s, a in zip(self.remote_shards, list(self.actors)):
                a.retain.remote(placement.experts_of(s))
            for s, w in self._local.items():
                w.retain(placement.experts_of(s))
        timer = threading.Timer(retain_after_s, retain)
        timer.daemon = True
        timer.start()

    # ---- lifecycle ----------------------------------------------------------------------
    def _connect(self) -> None:
        """Start an actor per remote shard, wait until they are loaded, then form the group with them."""
        self._teardown()
        self.generation += 1
        try:
            self.actors = [_RemoteShard.options(num_cpus=self.num_cpus, resources=self.shard_resources[s],
                                                max_restarts=0).remote(
                self.checkpoint, self.placement.to_json(), s, self.dtype, self.warm_rows)
                for s in self.remote_shards]
            info = dict(zip(self.remote_shards, ray.get([a.describe.remote() for a in self.actors],
                                                        timeout=self.connect_timeout_s)))
            info.update({s: describe_worker(w, in_engine=True) for s, w in self._local.items()})
            self.shard_info = [info[s] for s in range(self.num_shards)]    # every shard, in shard order
            host, world = _node_ip(), len(self.remote_shards) + 1
            store = dist.TCPStore(host, 0, world, True, timeout=_td(self.connect_timeout_s),
                                  wait_for_workers=False)
            started = [a.start.remote(self._rank[s], host, store.port, world, self.connect_timeout_s,
                                      self.compute_nice) for s, a in zip(self.remote_shards, self.actors)]
            self._pg = _gloo_group(store, 0, world, host, self.connect_timeout_s)
            ray.get(started, timeout=self.connect_timeout_s)
            self._store = store
        except Exception as exc:
            self._teardown()
            raise CollectiveGroupError(
                f"could not build the collective group of {self.num_shards} expert shards "
                f"(generation {self.generation}): {type(exc).__name__}: {exc}") from exc
        log.info("collective group %d up: shards on nodes %s (in the engine's process: %s)", self.generation,
                 [(i["node_id"] or "-")[:8] for i in self.shard_info], list(self.local_shards))

    def _probe(self, timeout_s: float) -> list[dict | BaseException | None]:
        """Each current shard actor's `status()` (in `remote_shards` order), asked at once through Ray: its dict, the RayError
        it died with, or None when it did not answer within `timeout_s`."""
        refs = [a.status.remote() for a in list(self.actors)]
        answered, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        out: list[dict | BaseException | None] = []
        for ref in refs:
            try:
                out.append(ray.get(ref) if ref in answered else None)
            except ray.exceptions.RayError as e:
                out.append(e)
        return out

    def _broken(self, shard: int, exc: BaseException) -> CollectiveGroupError:
        """Say which shards are at fault, then drop the group and every actor."""
        faults = []
        for s, st in zip(self.remote_shards, self._probe(2.0)):
            if st is None:
                faults.append(f"shard {s} unresponsive")
            elif isinstance(st, BaseException):
                faults.append(f"shard {s} actor dead ({type(st).__name__})")
            elif st["error"] or not st["serving"]:
                faults.append(f"shard {s} stopped serving: {st['error']}")
        self._teardown()
        return CollectiveGroupError(
            f"collective group {self.generation} broke waiting on shard {shard}: "
            f"{'; '.join(faults) or 'no shard reports a fault'}; gloo: {str(exc).splitlines()[0][:200]}. "
            "The next call rebuilds the group.")

    def _teardown(self) -> None:
        self._pg = None          # the last reference: closes the connections; shards' loops exit
        self._store = None
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:    # noqa: BLE001 -- already gone
                pass
        self.actors = []

    def close(self) -> None:
        """Stop every shard's loop (best effort), then kill the actors. Idempotent."""
        with self._lock:
            self._closed = True
            if self._pg is not None:
                works = []
                try:
                    for rank in self._rank.values():
                        stop_H = torch.tensor([OP_STOP, 0, 0, 0, 0, 0], dtype=torch.int64)
                        works.append((self._pg.send([stop_H], rank, TAG), stop_H))
                    for work, _ in works:
                        work.wait(_td(1.0))
                except RuntimeError:
                    pass
            self._teardown()

    def __del__(self):
        try:
            self._teardown()
        except Exception:        # noqa: BLE001 -- interpreter shutdown
            pass


class CollectivePending:
    """One layer's sends and receives in flight, and its local shards' calls still to compute."""

    def __init__(self, transport: CollectiveTransport, out: list[torch.Tensor], pending: list, deadline: float,
                 local: list[tuple[int, ShardCall]] = (), layer: int = 0):
        self.transport, self.out, self.pending, self.deadline = transport, out, pending, deadline
        self.local, self.layer = list(local), layer

    def wait(self) -> list[torch.Tensor]:
        local_error = None
        try:
            for i, c in self.local:            # while the remote shards compute theirs
                self.out[i] = self.transport._compute_local(self.layer, c)
        except Exception as exc:  # noqa: BLE001 -- raised below, once the remote answers are in
            local_error = exc                  # (left in flight, they would land in the next layer's buffers)
        self.local = []
        shard = -1
        try:
            for shard, work, _ in self.pending:                                                # 4
                work.wait(_td(self.deadline - time.monotonic()))
        except RuntimeError as exc:           # gloo: a peer closed its connection, or the deadline passed
            raise self.transport._failed(shard, exc) from exc
        finally:
            self.pending = []                 # the tensors the works read or wrote can go now
        if local_error is not None:
            raise local_error
        return self.out
