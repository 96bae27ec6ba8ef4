"""The engine core: the Engine, its step loop and its expert transport, behind one interface for
the EngineReplica, on a thread of the replica's process (`LocalCore`) or in a process of its own
(`RemoteCore` in the replica, `CoreProcess` in a Ray actor on the same node; AppConfig.engine_process).

Why a process of its own: the step loop is Python that releases the GIL in every torch op, and a
Serve replica runs Serve's threads beside it (the user-code event loop, the asyncio thread, the
pool that serializes every streamed message). Whenever one of them holds the GIL the step loop
waits, even with a core idle. Measured on 2 cores (bf16, collective, 64 streams x 64 tokens):
those threads held the GIL about as often as the step loop (py-spy --gil), and the decode step's
dense phase took 18.5-20 ms in the replica against 12 ms with the same engine alone; a thread
holding the GIL 6 ms a step beside the engine alone reproduced it (12.4 -> 19.6 ms). vLLM V1 splits
its EngineCore out for the same reason.

Data path, over one Unix socket (multiprocessing.connection, with an auth key):
  replica -> core: ("add", GenerationRequest) | ("abort", request_id)
  core -> replica: one message per engine step: (events, mirror), where events is
                   [(request_id, token tuple | exception)] and mirror the stats the replica reads
                   on its hot path (running, waiting, recent step times)
Control path (rare), over Ray calls to the actor: warm-up, metrics samples, placement changes,
describe. The actor is pinned to the replica's node and owned by it: it dies with the replica. If
the core dies first, every stream in flight ends with EngineCoreLost (UNAVAILABLE, retry) and the
replica reports itself unhealthy, so Serve replaces it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import threading
from multiprocessing.connection import Client, Connection, Listener
from typing import AsyncIterator, Callable

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serving.deployments import startup_priority
from serving.deployments.config import AppConfig
from serving.engine.async_engine import AsyncEngine, EngineCoreLost, chunked, post_events, request_events
from serving.engine.request import FinishReason, GenerationRequest, TokenEvent
from serving.metrics import EngineSample
from serving.model.sampling import SamplingParams
from serving.parallel.placement import Placement
from serving.thread_priority import compute_policy, raise_priority, thread_nice, thread_policy

WARM_UP_PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)
RECENT_STEPS = 9                       # step times the mirror carries (admission takes their median)


def _warm_up_request(tag: str) -> GenerationRequest:
    return GenerationRequest(request_id=f"warm-up-{tag}", prompt_token_ids=WARM_UP_PROMPT,
                             sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))


class LocalCore:
    """The engine on a step thread of this process (serving/engine/async_engine.py)."""

    def __init__(self, cfg: AppConfig, placement_json: str, shard_handles: list):
        from serving.deployments.engine_replica import SHARD_UNREACHABLE, build_engine   # it imports this module
        torch.set_num_threads(cfg.engine_threads)
        self.cfg = cfg
        self.engine, self.dispatcher = build_engine(cfg, Placement.from_json(placement_json), shard_handles)
        self.async_engine = AsyncEngine(self.engine, retryable=SHARD_UNREACHABLE)
        compute_policy(self.async_engine.thread_id)   # before its first step: its OpenMP threads inherit it
        self.sampler: Callable[[], EngineSample] | None = None   # EngineSampler, from the warm-up's end

    # ---- the data path ----
    def stream_chunks(self, request: GenerationRequest, chunk_tokens: int | Callable[[], int],
                      max_hold_s: float) -> AsyncIterator[list[TokenEvent]]:
        return self.async_engine.stream_chunks(request, chunk_tokens, max_hold_s)

    def num_running(self) -> int:
        return self.engine.stats.num_running

    def num_waiting(self) -> int:
        return self.engine.stats.num_waiting

    def recent_step_seconds(self) -> list[float]:
        return self.engine.stats.recent_step_seconds[-RECENT_STEPS:]

    # ---- control ----
    def warm_up(self, timeout_s: float = 600.0) -> None:
        """One short request through the whole path (shards, first steps, allocator), blocking:
        the first real requests on a new replica, which arrive in a burst when it joins during a
        spike, would otherwise pay for it in TTFT. Its tokens are not reported."""
        done, failure = threading.Event(), []

        def emit(ev: object) -> None:
            if isinstance(ev, BaseException):
                failure.append(ev)
                done.set()
            elif ev.finish_reason is not None:
                done.set()
        self.async_engine.submit(_warm_up_request(str(id(self))), emit)
        if not done.wait(timeout_s):
            raise TimeoutError(f"the engine's warm-up did not finish in {timeout_s} s")
        if failure:
            raise failure[0]
        self.engine.prepare_guides()            # guided decoding's vocabulary tables (~0.5 s for 32k)
        from serving.deployments.engine_replica import EngineSampler, model_labels
        self.dispatcher.take_routed_counts()     # the warm-up's tokens are not traffic
        self.sampler = EngineSampler(self.engine, self.dispatcher, model_labels(self.cfg, self.engine.model.config))

    def sample(self) -> EngineSample:
        """The engine's metrics since the last sample (counted from the warm-up's end)."""
        return self.sampler()

    def set_placement(self, placement_json: str) -> None:
        placement = Placement.from_json(placement_json)
        self.dispatcher.set_placement(placement)
        on_change = getattr(self.dispatcher.transport, "set_placement", None)
        if on_change is not None:     # collective: this core's own shard actors follow it
            on_change(placement)

    def set_step_nice(self, nice: int | None) -> None:
        raise_priority(nice, self.async_engine.thread_id)

    async def describe_async(self) -> dict:
        return self.describe()

    def describe(self) -> dict:
        sched = self.engine.config
        return {"transport": self.dispatcher.transport.name,
                "placement_version": self.dispatcher.placement.version,
                "step_loop_nice": thread_nice(self.async_engine.thread_id),
                # scheduling policies (serving/thread_priority.py): the step loop, and its process
                "step_loop_policy": thread_policy(self.async_engine.thread_id),
                "core_process_policy": thread_policy(os.getpid()),
                "core_pid": os.getpid(),
                "shards": list(getattr(self.dispatcher.transport, "shard_info", [])),
                "max_num_seqs": sched.max_num_seqs, "kv_tokens": sched.kv_blocks * sched.block_size,
                "kernel_warm_up": dataclasses.asdict(w) if (w := self.engine.kernel_warm_up) else None}

    @property
    def alive(self) -> bool:
        return True

    def shutdown(self) -> None:
        self.async_engine.shutdown()
        close = getattr(self.dispatcher.transport, "close", None)
        if close is not None:      # collective: stop and kill the shard actors this core owns
            close()


# ---- the core in a process of its own --------------------------------------------------------

def _pack(ev: object) -> object:
    """A TokenEvent as a tuple (cheaper to pickle than the dataclass); exceptions as they are."""
    if isinstance(ev, TokenEvent):
        return (ev.token_id, ev.text_delta, ev.logprob,
                ev.finish_reason.value if ev.finish_reason is not None else None,
                ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens, ev.top_logprobs,
                ev.prompt_logprobs, ev.prompt_top_logprobs)
    return ev


def _unpack(request_id: str, item: object) -> object:
    if isinstance(item, tuple):
        tok, text, logprob, reason, prompt, completion, cached, top, prompt_lp, prompt_top = item
        return TokenEvent(request_id=request_id, token_id=tok, text_delta=text, logprob=logprob,
                          finish_reason=FinishReason(reason) if reason is not None else None,
                          prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                          top_logprobs=top, prompt_logprobs=prompt_lp, prompt_top_logprobs=prompt_top)
    return item


class CoreProcess:
    """Runs in the core actor: a LocalCore, serving one replica over a Unix socket. The step
    thread sends each step's events in one message (`_send_step`); a reader thread takes the
    replica's requests and aborts."""

    def __init__(self, args: dict, placement_json: str, shard_handles: list):
        self.core = LocalCore(AppConfig.from_args(args), placement_json, shard_handles)
        self._dir = tempfile.mkdtemp(prefix="moe-core-")
        self._key = os.urandom(16)
        self._listener = Listener(os.path.join(self._dir, "engine.sock"), family="AF_UNIX", authkey=self._key)
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._batch: list[tuple[str, object]] = []           # step thread only
        self.core.async_engine.after_flush = self._send_step
        threading.Thread(target=self._serve, name="engine-core-reader", daemon=True).start()

    def address(self) -> tuple[str, bytes]:
        return self._listener.address, self._key

    def warm_up(self) -> None:
        self.core.warm_up()
        startup_priority.restore()              # ready: back to the workers' niceness

    def sample(self) -> EngineSample:
        return self.core.sample()

    def set_placement(self, placement_json: str) -> None:
        self.core.set_placement(placement_json)

    def set_step_nice(self, nice: int | None) -> None:
        self.core.set_step_nice(nice)

    def describe(self) -> dict:
        return self.core.describe()

    def shutdown(self) -> None:
        self.core.shutdown()
        self._listener.close()                  # unlinks the socket file
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- the data path (threads of this process) ----
    def _serve(self) -> None:
        """Accept the replica's connection, then apply its requests until it goes away."""
        conn = self._listener.accept()
        self._conn = conn
        engine = self.core.async_engine
        try:
            while True:
                op, arg = conn.recv()
                if op == "add":
                    rid = arg.request_id
                    try:
                        engine.submit(arg, lambda ev, rid=rid: self._batch.append((rid, _pack(ev))))
                    except Exception as exc:  # noqa: BLE001 -- the request's own error, sent back
                        self._send([(rid, exc)])
                elif op == "abort":
                    engine.abort(arg)
        except (EOFError, OSError, TypeError):  # the replica went away (TypeError: the connection was
            pass                                # closed under us): it owns, and kills, this actor

    def _send_step(self) -> None:
        if not self._batch or self._conn is None:
            return
        batch, self._batch = self._batch, []
        self._send(batch)

    def _send(self, batch: list) -> None:
        s = self.core.engine.stats
        mirror = (s.num_running, s.num_waiting, s.recent_step_seconds[-RECENT_STEPS:])
        try:
            with self._send_lock:
                self._conn.send((batch, mirror))
        except (OSError, ValueError):         # the replica is gone
            pass


_CoreActor = ray.remote(CoreProcess)


class RemoteCore:
    """The replica's side of a CoreProcess: starts the actor on this node, streams over the socket."""

    def __init__(self, actor, conn: Connection):
        self.actor, self._conn = actor, conn
        self._send_lock = threading.Lock()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._mirror: tuple[int, int, list[float]] = (0, 0, [])
        self._lost: str | None = None
        threading.Thread(target=self._read, name="engine-core-events", daemon=True).start()

    @classmethod
    async def start(cls, cfg: AppConfig, placement_json: str, shard_handles: list) -> "RemoteCore":
        node = ray.get_runtime_context().get_node_id()
        actor = _CoreActor.options(
            num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        ).remote(cfg.to_args(), placement_json, shard_handles)
        address, key = await actor.address.remote()
        conn = await asyncio.to_thread(Client, address, "AF_UNIX", authkey=key)
        await actor.warm_up.remote()
        return cls(actor, conn)

    # ---- the data path ----
    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        rid = request.request_id

        def start(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self._queues[rid] = (loop, queue)
            try:
                self._send(("add", request))
            except EngineCoreLost:
                self._queues.pop(rid, None)
                raise

        def end(finished: bool) -> None:
            self._queues.pop(rid, None)
            if not finished and self._lost is None:
                try:
                    self._send(("abort", rid))
                except EngineCoreLost:
                    pass
        return request_events(start, end)

    def stream_chunks(self, request: GenerationRequest, chunk_tokens: int | Callable[[], int],
                      max_hold_s: float) -> AsyncIterator[list[TokenEvent]]:
        return chunked(self.stream(request), chunk_tokens, max_hold_s)

    def num_running(self) -> int:
        return self._mirror[0]

    def num_waiting(self) -> int:
        return self._mirror[1]

    def recent_step_seconds(self) -> list[float]:
        return self._mirror[2]

    def _send(self, msg: tuple) -> None:
        if self._lost is not None:
            raise EngineCoreLost(self._lost)
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError) as exc:
            raise EngineCoreLost(f"the engine core process is gone ({type(exc).__name__})") from exc

    def _read(self) -> None:
        """Each step's events to their event loops (one call per loop), until the core goes away."""
        try:
            while True:
                batch, self._mirror = self._conn.recv()
                # one get per event: a stream's end() pops its queue on the event loop's thread, and a
                # check-then-index here could raise between the two and take down this reader
                targets = ((self._queues.get(rid), rid, item) for rid, item in batch)
                post_events((*target, _unpack(rid, item)) for target, rid, item in targets if target is not None)
        except Exception as exc:  # noqa: BLE001 -- EOF or a reset: the core is gone either way
            self._lost = f"the engine core process died ({type(exc).__name__})"
        lost = EngineCoreLost(self._lost)
        post_events((loop, queue, lost) for loop, queue in list(self._queues.values()))

    # ---- control ----
    def sample(self, timeout_s: float = 5.0) -> EngineSample:
        return ray.get(self.actor.sample.remote(), timeout=timeout_s)

    def set_placement(self, placement_json: str) -> None:
        self.actor.set_placement.remote(placement_json)

    def set_step_nice(self, nice: int | None) -> None:
        ray.get(self.actor.set_step_nice.remote(nice))

    async def describe_async(self) -> dict:
        return await self.actor.describe.remote()

    @property
    def alive(self) -> bool:
        return self._lost is None

    def shutdown(self) -> None:
        try:
            ray.get(self.actor.shutdown.remote(), timeout=10)
        except Exception:   # noqa: BLE001 -- dead already, or stuck: killed below either way
            pass
        try:
            self._conn.close()
        except OSError:
            pass
        ray.kill(self.actor, no_restart=True)

