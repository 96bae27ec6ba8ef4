"""Serve request router for the EngineReplica deployment: prefix affinity, else power of two choices.

A thin shim around serving/routing/prefix_affinity.py. Serve config (cluster/serve_config.yaml):

    deployments:
      - name: EngineReplica
        request_router_config:
          request_router_class: serving.routing.ray_router:PrefixAffinityRouter
          request_router_kwargs: {block_tokens: 16, block_chars: 64, max_load_gap: 8}

Ray 2.60 facts this relies on (ray/serve/_private/request_router/, router.py, proxy.py):
- The router object lives in every caller of the deployment: Serve's gRPC proxy (one per node),
  and the Ingress deployment's handle with `ingress: deployment`. Each keeps its own affinity
  memory; with one proxy (`proxy_location: HeadOnly`) that is one memory. HAProxy's ingress
  (`--grpc-ingress haproxy`) does not pass through here: it balances by its own rules.
- From the gRPC proxy a request's only argument is `pickle.dumps(gRPCRequest(user_request_proto))`
  (proxy_request_response.py); through a handle it is our GenerationRequest.
- `choose_replicas` returns ranked groups; Serve takes the least loaded replica of the first
  group that accepts the request (queue below max_ongoing_requests), else the next group.
- `on_request_routed` is called once a replica accepted the request (Serve's strict
  max-ongoing-requests mode, on by default outside Ray Client), so only accepted requests are
  remembered. It may also be called for a request `choose_replicas` never saw (when several wait
  at once, a replica found while routing one may take another), so it reads the prompt there too
  if it has not been read.
- No FIFOMixin: with it, a replica found for one request may be handed to an older one.
- `on_request_completed` may come before `on_request_routed` for the same request: Serve registers
  the completion callback before it reads whether the replica accepted, and on its gRPC data path
  (`RAY_SERVE_PROXY_USE_GRPC=1`, serving/launcher.py) a unary call's acceptance arrives with its
  response, so the call is done (and its completion queued on this loop) by then. A completion for
  a request not in flight is kept (`_completed_first`) and cancels the routing that follows it.
  Serve's own queue-length cache keeps such a request counted (its decrement lands before the
  accepted count is written): one more reason the load here is this router's own count.
- Serve takes a replica of a group by its queue-length cache, and where that has no fresh entry
  (none for 10 s, or invalidated) it probes the group's replicas with a 0.1 s deadline; one that
  does not answer in time is passed over for the next group, at once. A replica busy in a step on
  a loaded machine can miss that deadline, and the next group is the one without the prompt's
  history. So the first HOME_ATTEMPTS rankings for a request hold only the cheapest group: Serve
  then probes it again with its doubled deadline (0.2 s) before the full ranking lets the request
  go elsewhere.
"""
from __future__ import annotations

import pickle
import random
from typing import Any, List, Optional

from ray.serve._private.common import gRPCRequest
from ray.serve.request_router import (LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter,
                                      RunningReplica)

from serving.routing.prefix_affinity import AffinityConfig, PrefixAffinity, prompt_blocks

MAX_PENDING = 10_000    # prompts remembered between choose_replicas and on_request_routed, and completions
                        # reported before their routing (oldest dropped)
HOME_ATTEMPTS = 2       # rankings of one request that offer only its cheapest group (module doc)


KSERVE_GENERATE = ("ModelInfer", "ModelStreamInfer")   # KServe v2 methods whose request carries a prompt


def request_prompt(arg: Any, method: str = "") -> tuple[str | tuple[int, ...], str] | None:
    """(prompt, cache salt) of a request to `method` as the router sees it, or None (not a
    generation request, or one the replica will reject: routed by load and answered there)."""
    if isinstance(arg, (bytes, bytearray)):
        try:
            arg = pickle.loads(arg)
        except Exception:
            return None
    if isinstance(arg, gRPCRequest):
        arg = arg.user_request_proto
    if isinstance(arg, (bytes, bytearray)):      # KServe requests reach the replica unparsed (api/protos.py)
        return _kserve_text(arg) if method in KSERVE_GENERATE else None
    ids = getattr(arg, "prompt_token_ids", None)            # GenerationRequest (handle callers)
    if ids is not None:
        return tuple(ids), getattr(arg, "cache_salt", "")
    if getattr(getattr(arg, "DESCRIPTOR", None), "full_name", None) != "moe_serving.v1.GenerateRequest":
        return None            # Tokenize's request has a prompt too, but nothing gets cached
    which = arg.WhichOneof("prompt")
    if which == "text":
        return arg.text, ""
    if which == "token_ids":
        return tuple(arg.token_ids.ids), ""
    if which == "chat":                         # the contents in order (the template's text is not rendered here)
        return "".join(f"\x1e{m.role}\x1f{m.content}" for m in arg.chat.messages), ""
    return None


def _kserve_text(data: bytes) -> tuple[str, str] | None:
    """inputs[text_input] of a serialized KServe v2 ModelInferRequest (contents or raw contents)."""
    from serving.api.kserve import unpack_bytes
    from serving.api.kserve_protos import kserve
    try:
        request = kserve.ModelInferRequest.FromString(bytes(data))
        raw = list(request.raw_input_contents)
        for i, tensor in enumerate(request.inputs):
            if tensor.name == "text_input":
                values = (unpack_bytes(raw[i], "text_input") if raw else list(tensor.contents.bytes_contents))
                return (values[0].decode("utf-8"), "") if len(values) == 1 else None
    except Exception:             # malformed: the replica answers INVALID_ARGUMENT
        return None
    return None


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve's RequestRouter around PrefixAffinity (module doc)."""

    def initialize_state(self, **kwargs) -> None:
        self.affinity = PrefixAffinity(AffinityConfig(**kwargs))
        self._blocks: dict[str, list[int]] = {}      # internal request id -> its prompt blocks, until routed
        self._rankings: dict[str, int] = {}          # internal request id -> rankings given, until routed
        # requests this router sent to each replica that have not completed: the load it ranks by
        self._in_flight: dict[ReplicaID, set[str]] = {}
        # completions reported before their request was routed (module doc), oldest first
        self._completed_first: dict[tuple[ReplicaID, str], None] = {}

    def _prompt_blocks(self, pending: PendingRequest | None) -> list[int]:
        if pending is None or not pending.args:
            return []
        key = pending.metadata.internal_request_id
        blocks = self._blocks.get(key)
        if blocks is None:
            found = request_prompt(pending.args[0], pending.metadata.call_method)
            blocks = prompt_blocks(found[0], self.affinity.cfg, found[1]) if found else []
            self._blocks[key] = blocks
            if len(self._blocks) > MAX_PENDING:        # requests cancelled before any replica took them
                gone = next(iter(self._blocks))
                del self._blocks[gone]
                self._rankings.pop(gone, None)
        return blocks

    def _loads(self, replicas: List[RunningReplica]) -> dict[ReplicaID, int]:
        """Requests in flight on each replica: the fewer of this router's own (routed, not completed)
        and Serve's queue-length cache (what the replica last reported, plus what was sent since,
        minus what completed; all callers' requests). Each errs high where the other does not: the
        cache keeps a burst's count until a refresh where completions land before acceptances (the
        gRPC data path, module doc: a replica looked busy and the next turns of every conversation
        it held went to the other one), and the own count misses other callers but leaks only if
        Serve never reports a completion."""
        loads = {}
        for r in replicas:
            own, cached = len(self._in_flight.get(r.replica_id, ())), self.replica_queue_len_cache.get(r.replica_id)
            loads[r.replica_id] = own if cached is None else min(own, cached)
        return loads

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
            return [[self._replicas[i] for i in ids]] if ids else []
        blocks = self._prompt_blocks(pending_request)
        if blocks and len(candidate_replicas) > 1:
            ranked = self.affinity.rank(blocks, self._loads(candidate_replicas))
            if ranked:     # within a group Serve takes the least loaded, the first of equals: shuffled
                key = pending_request.metadata.internal_request_id
                given = self._rankings[key] = self._rankings.get(key, 0) + 1
                if given <= HOME_ATTEMPTS and len(ranked) > 1:   # a slow probe is not a full replica
                    ranked = ranked[:1]
                return [random.sample(g, len(g)) for g in
                        ([self._replicas[i] for i in group if i in self._replicas] for group in ranked)]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]   # power of two choices

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        # a request Serve routed without asking choose_replicas about it (a replica found while
        # routing another pending request may serve this one) has no blocks computed yet: read them now
        self._prompt_blocks(pending_request)
        key = pending_request.metadata.internal_request_id
        if (replica_id, key) in self._completed_first:        # its completion came first (module doc)
            del self._completed_first[(replica_id, key)]
        else:
            self._in_flight.setdefault(replica_id, set()).add(key)
        self._rankings.pop(key, None)
        blocks = self._blocks.pop(key, None)
        if blocks:
            self.affinity.record(blocks, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._rankings.pop(internal_request_id, None)
        ids = self._in_flight.get(replica_id)
        if ids is not None and internal_request_id in ids:
            ids.discard(internal_request_id)
            return
        # routed next (a unary call over the gRPC data path), or never (rejected, cancelled): bounded.
        # Its prompt's blocks stay in `_blocks` for the routing that follows (that dict's own bound
        # drops those of a request never routed)
        self._completed_first[(replica_id, internal_request_id)] = None
        if len(self._completed_first) > MAX_PENDING:
            del self._completed_first[next(iter(self._completed_first))]

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        self.affinity.keep_only(live)
        for gone in [r for r in self._in_flight if r not in live]:
            del self._in_flight[gone]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget(replica_id)
        self._in_flight.pop(replica_id, None)
