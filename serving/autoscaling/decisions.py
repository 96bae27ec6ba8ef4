"""Where autoscaling decisions go once taken: an in-process record and an optional hook.

Kept apart from ray_adapter on purpose: Serve pickles the policy's own module *by value*
(cloudpickle.register_pickle_by_value), so module-level state there would be a private copy
inside the controller. This module is imported by reference, so `last_decisions()` called in
the controller process sees what the policies recorded.
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Callable

DecisionHook = Callable[[str, int, int, str], None]   # (deployment, desired, current, reason)

log = logging.getLogger(__name__)
_lock = threading.Lock()
_last: dict[str, "DecisionRecord"] = {}
_counts: dict[tuple[str, str], int] = {}
_hooks: list[DecisionHook] = []


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    deployment: str
    desired: int          # what the policy asked for (before Serve's delays/bounds)
    current: int          # running replicas when it decided
    target: int           # replicas ordered when it decided
    reason: str
    time: float


def set_decision_hook(hook: DecisionHook | None) -> None:
    """Install (or with None, remove all) process-wide hooks called on every decision."""
    with _lock:
        _hooks.clear()
        if hook is not None:
            _hooks.append(hook)


def resolve_hook(path: str | None) -> DecisionHook | None:
    """'pkg.mod:fn' -> fn (policy_kwargs must be JSON, so hooks travel as import paths)."""
    if not path:
        return None
    mod, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"decision hook must look like 'pkg.module:function', got {path!r}")
    return getattr(importlib.import_module(mod), attr)


def record_decision(rec: DecisionRecord, hook: DecisionHook | None = None) -> None:
    with _lock:
        _last[rec.deployment] = rec
        _counts[(rec.deployment, rec.reason)] = _counts.get((rec.deployment, rec.reason), 0) + 1
        hooks = list(_hooks) + ([hook] if hook is not None else [])
    for h in hooks:
        try:
            h(rec.deployment, rec.desired, rec.current, rec.reason)
        except Exception:   # a broken metrics hook must never break autoscaling
            log.exception("autoscaling decision hook failed")


def last_decisions() -> dict[str, DecisionRecord]:
    """The latest decision per deployment, in this process."""
    with _lock:
        return dict(_last)


def decision_counts() -> dict[tuple[str, str], int]:
    """(deployment, reason) -> decisions taken, in this process."""
    with _lock:
        return dict(_counts)


def reset() -> None:
    with _lock:
        _last.clear()
        _counts.clear()
        _hooks.clear()


def make_ray_metrics_hook(prefix: str = "moe_autoscaling") -> DecisionHook:
    """A hook exporting decisions with ray.util.metrics (works inside the Serve controller, like
    Serve's own ray_serve_autoscaling_* gauges; appears on Ray's metrics export port as
    `ray_<prefix>_desired_replicas`, `ray_<prefix>_current_replicas`, `ray_<prefix>_decisions_total`)."""
    from ray.util import metrics as rm
    desired = rm.Gauge(f"{prefix}_desired_replicas", "Replicas our policy asked for", tag_keys=("deployment",))
    current = rm.Gauge(f"{prefix}_current_replicas", "Running replicas when the policy decided",
                       tag_keys=("deployment",))
    decisions = rm.Counter(f"{prefix}_decisions", "Autoscaling decisions by reason",
                           tag_keys=("deployment", "reason"))

    def hook(deployment: str, want: int, have: int, reason: str) -> None:
        desired.set(want, tags={"deployment": deployment})
        current.set(have, tags={"deployment": deployment})
        decisions.inc(1, tags={"deployment": deployment, "reason": reason})
    return hook
