"""Free TCP ports for local clusters, tests and benchmarks, picked where nothing else will take them.

Binding port 0 returns a port from the kernel's ephemeral range, the range every outgoing
connection's local port also comes from. A port picked that way and bound later by another
process (Serve's gRPC proxy, Prometheus, a metrics server) can be taken in between by any of the
hundreds of connections a starting Ray cluster opens: CI saw Serve's proxy fail with
"Failed to bind to address '127.0.0.1:45935'" that way. So ports come from below the ephemeral range
and above Ray's worker ports (10002-19999 by default), in a random order, each checked bindable.
"""
from __future__ import annotations

import random
import socket

RAY_WORKER_PORTS_END = 19999       # Ray's default max_worker_port
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range
_ATTEMPTS = 200


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default where unreadable)."""
    try:
        with open(path) as f:
            low, high = (int(v) for v in f.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def candidate_range(ephemeral: tuple[int, int]) -> tuple[int, int]:
    """Ports [low, high] outside both the ephemeral range and Ray's worker ports: between them,
    else above the ephemeral range; (0, 0) if neither leaves at least 1000 ports."""
    low, high = RAY_WORKER_PORTS_END + 1, ephemeral[0] - 1
    if high - low >= 1000:
        return low, high
    low, high = max(ephemeral[1] + 1, RAY_WORKER_PORTS_END + 1), 65535
    return (low, high) if high - low >= 1000 else (0, 0)


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A port nobody holds now on `host` and on every interface, outside the ephemeral range
    (falls back to the kernel's pick, port 0, only when no such range exists or all tries failed)."""
    low, high = candidate_range(ephemeral_range())
    if low:
        rng = rng or random.SystemRandom()
        for _ in range(_ATTEMPTS):
            port = rng.randint(low, high)
            if _bindable(port, host) and _bindable(port, "0.0.0.0"):
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
