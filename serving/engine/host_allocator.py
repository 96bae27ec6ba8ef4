"""glibc malloc settings for a CPU serving process: keep freed memory instead of returning it to the OS.

A CPU engine step allocates and frees the same large tensors every step (a 2048-token prefill:
activations of 4-16 MB per layer, logits, the gathered KV). glibc's defaults serve blocks above
its mmap threshold (128 KB, rising to at most 32 MB) with a fresh mmap and give the heap's free
top back above 128 KB, so every step pays the page faults of zeroing new pages again: on a 2-core
box a 4096-token prefill took 0.5-1.5 s (system time ~40% of the CPU) and 0.45-0.5 s with these
settings. vLLM gets the same from the tcmalloc it preloads where its wheel bundles one; this does
it in-process, with no preload, so `python -m serving.cli` and Ray workers behave alike.

`mallopt` changes the allocator for the rest of the process (later allocations); it is a no-op
off glibc. MOE_HOST_ALLOCATOR=default leaves malloc alone (for A/B runs).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20    # glibc's upper limit: blocks below this come from the heap
TRIM_THRESHOLD_BYTES = 1 << 30     # give the heap's free top back only above 1 GiB
TOP_PAD_BYTES = 64 << 20           # grow the heap in 64 MB steps

_applied: bool | None = None


def tune_host_allocator() -> bool:
    """Apply the settings once per process; True if glibc accepted them."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MOE_HOST_ALLOCATOR", "tuned") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):        # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_TOP_PAD, TOP_PAD_BYTES)))
    if not _applied:
        log.warning("glibc mallopt refused the serving allocator settings; running with the defaults")
    return _applied
