"""The serving processes' glibc malloc settings: a freed step-sized block stays in the heap.

Each case runs in a fresh interpreter, since mallopt changes the allocator for the whole process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

# allocate and free a 16 MB block (a prefill step's activation), then ask glibc where it went:
# with the defaults it was an mmap, unmapped on free; tuned, it came from the heap and stays there
_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    from serving.engine.host_allocator import tune_host_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
    applied = [tune_host_allocator(), tune_host_allocator()]
    size = 16 << 20
    p = libc.malloc(size)
    during = libc.mallinfo2()
    libc.memset(p, 1, size)
    libc.free(p)
    after = libc.mallinfo2()
    print(json.dumps({"applied": applied, "mmapped_during": during.hblkhd, "heap_free_after": after.fordblks}))
""")


def _probe(env_extra: dict[str, str]) -> dict:
    import os
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuned_process_keeps_a_freed_16mb_block_in_its_heap():
    r = _probe({"MOE_HOST_ALLOCATOR": "tuned"})
    assert r["applied"] == [True, True]
    assert r["mmapped_during"] < 16 << 20          # served from the heap, not a fresh mmap
    assert r["heap_free_after"] >= 16 << 20        # and kept for the next step after free


@glibc
def test_default_allocator_maps_and_unmaps_the_same_block():
    # the behaviour the tuning removes (and the opt-out for A/B runs)
    r = _probe({"MOE_HOST_ALLOCATOR": "default"})
    assert r["applied"] == [False, False]
    assert r["mmapped_during"] >= 16 << 20
    assert r["heap_free_after"] < 16 << 20
