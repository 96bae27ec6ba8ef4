"""Live rebalancing: a new placement is published to Ray's GCS key-value store, and every
engine and shard replica picks it up on its own (no broadcast RPC, any replica count).

  1. `publish_placement` (from `moe-serve placement --apply`) stores the plan, version + 1.
  2. Engine replicas swap their dispatcher's placement; the next MoE layer routes by it.
  3. A shard sent an expert it does not hold loads just that expert on first use (the
     only weights it reads), and drops the experts the plan took away after a grace period.
The math is the same whichever copy serves a token, so in-flight requests keep their tokens.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from serving.parallel.placement import Placement

log = logging.getLogger(__name__)
KV_NAMESPACE = "moe_serve"
PLACEMENT_KEY = "placement"


def read_published() -> Placement | None:
    from ray.experimental.internal_kv import _internal_kv_get
    raw = _internal_kv_get(PLACEMENT_KEY, namespace=KV_NAMESPACE)
    return Placement.from_json(raw.decode() if isinstance(raw, bytes) else raw) if raw else None


def publish_placement(placement: Placement) -> Placement:
    """Store `placement` as the next version (must run in a process attached to the cluster)."""
    from ray.experimental.internal_kv import _internal_kv_put
    current = read_published()
    versioned = Placement(num_shards=placement.num_shards, copies=placement.copies,
                          version=(current.version if current else 0) + 1)
    _internal_kv_put(PLACEMENT_KEY, versioned.to_json(), namespace=KV_NAMESPACE)
    return versioned


def clear_published() -> None:
    """Forget the published placement (a redeploy: the new app starts from its own plan)."""
    from ray.experimental.internal_kv import _internal_kv_del
    _internal_kv_del(PLACEMENT_KEY, namespace=KV_NAMESPACE)


class PlacementWatcher:
    """Calls `on_change(placement)` (on its own thread) whenever a newer version is published."""

    def __init__(self, on_change: Callable[[Placement], None], version: int = 0, poll_s: float = 1.0):
        self.on_change, self.version, self.poll_s = on_change, version, poll_s
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="placement-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                p = read_published()
                if p is not None and p.version > self.version:
                    self.version = p.version
                    self.on_change(p)
            except Exception as exc:   # a bad poll must never take the replica down
                log.warning("placement poll failed: %s", exc)
