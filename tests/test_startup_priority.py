"""startup_priority: a niced process (a Ray worker) imports at nice 0 and is put back when ready.
Each case runs in a fresh interpreter (niceness is per thread and cannot be undone without privilege)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, os, threading, time
io = threading.Thread(target=time.sleep, args=(MAX_S + 2,), daemon=True)
io.start()                                      # like Ray's I/O threads: started before the worker is niced
os.nice(NICE)                                   # as Ray starts its workers (RAY_worker_niceness)
from serving.deployments import startup_priority
def nice_of(tid=0):
    return os.getpriority(os.PRIO_PROCESS, tid)
boosted = startup_priority.boost(max_s=MAX_S)
during = nice_of()
seen = {}
t = threading.Thread(target=lambda: seen.update(child=nice_of()))   # started while boosted
t.start(); t.join()
own = threading.Thread(target=time.sleep, args=(MAX_S + 2,), daemon=True)
own.start()                                     # started while boosted, then given its own niceness
try:                                            # (compute_nice: the engine's step loop)
    os.setpriority(os.PRIO_PROCESS, own.native_id, 5)
except PermissionError:                         # no CAP_SYS_NICE: it stays where it was
    pass
again = startup_priority.boost()                # a second call changes nothing
if RESTORE:
    startup_priority.restore()
else:
    import time; time.sleep(MAX_S + 0.5)         # the timer restores it
io_nice, own_nice = nice_of(io.native_id), nice_of(own.native_id)
after = sorted({nice_of(int(tid)) for tid in os.listdir("/proc/self/task") if int(tid) not in (io.native_id, own.native_id)})
print(json.dumps(dict(boosted=boosted, during=during, child=seen["child"], again=again, after=after,
                      io=io_nice, own=own_nice)))
"""


def _run(nice: int, restore: bool = True, max_s: float = 30.0) -> dict:
    code = SCRIPT.replace("NICE", str(nice)).replace("MAX_S", str(max_s)).replace("RESTORE", str(restore))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_niced_worker_imports_at_nice_0_and_is_restored_when_ready():
    r = _run(15)
    if os.geteuid() != 0:                        # no CAP_SYS_NICE: nothing changes
        assert r == dict(boosted=False, during=15, child=15, again=False, after=[15], io=0, own=15)
        return
    assert r["boosted"] and r["during"] == 0 and r["child"] == 0 and not r["again"]
    assert r["after"] == [15]                     # every thread it started back to the worker's niceness
    assert r["io"] == 0                           # a thread it did not start keeps its own
    assert r["own"] == 5                          # and so does one given its own niceness meanwhile


def test_the_timer_restores_a_process_that_never_became_ready():
    r = _run(15, restore=False, max_s=0.5)
    assert r["after"] == [15] and r["io"] == 0 and r["own"] == (5 if os.geteuid() == 0 else 15)


def test_a_process_that_is_not_niced_is_left_alone():
    r = _run(0)
    assert r == dict(boosted=False, during=0, child=0, again=False, after=[0], io=0, own=5)
