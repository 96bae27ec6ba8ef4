"""Patch a module of Ray Serve where a worker loads it: now if it is loaded, else right after its import.

Every Ray worker of our clusters runs the same setup hook (serving/deployments/worker_setup.py), and
some of its patches are for modules that only some workers ever import (Ray Serve's HAProxy module,
its gRPC helpers). Importing them in the hook would make every worker pay for it: an expert shard's
actor, which never imports Ray Serve, would spend 1.2 s of CPU on it here. `when_imported` runs the
patch on the module if it is loaded, and otherwise leaves a finder on `sys.meta_path` that finds
nothing itself: when the module is imported, it lets the other finders find it (once: it leaves
`sys.meta_path` then) and runs the patch on the module once its code has run.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Callable, TypeVar

T = TypeVar("T")


def when_imported(name: str, patch: Callable[[ModuleType], T]) -> T | None:
    """`patch(module)` now if module `name` is loaded (its result), else after it is imported (None).
    The same (name, patch) waits only once however often it is asked for."""
    module = sys.modules.get(name)
    if module is not None:
        return patch(module)
    if not any(isinstance(f, AfterImport) and (f.name, f.patch) == (name, patch) for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImport(name, patch))
    return None


def waiting(name: str) -> int:
    """How many patches wait for module `name` to be imported."""
    return sum(isinstance(f, AfterImport) and f.name == name for f in sys.meta_path)


class AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable[[ModuleType], object]):
        self.name, self.patch = name, patch

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self.patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, patch: Callable[[ModuleType], object]):
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        self.patch(module)
