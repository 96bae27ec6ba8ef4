"""serving/ports.py: free ports come from outside the kernel's ephemeral range, and are bindable."""
from __future__ import annotations

import random
import socket

import pytest

from serving import ports


def test_candidate_range_avoids_ephemeral_and_ray_worker_ports():
    assert ports.candidate_range((32768, 60999)) == (20000, 32767)
    # an ephemeral range reaching down into Ray's worker ports: above it instead
    assert ports.candidate_range((15000, 60000)) == (60001, 65535)
    # nothing left outside it: the kernel's pick
    assert ports.candidate_range((1024, 65535)) == (0, 0)


def test_ephemeral_range_reads_the_kernel_file(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ports.ephemeral_range(str(f)) == (40000, 50000)
    assert ports.ephemeral_range(str(tmp_path / "missing")) == ports.DEFAULT_EPHEMERAL


class _Scripted(random.Random):
    """Returns the listed ports in order (then the range's low end)."""
    def __init__(self, picks):
        super().__init__(0)
        self.picks = list(picks)

    def randint(self, a, b):
        return self.picks.pop(0) if self.picks else a


def test_free_port_is_outside_the_ephemeral_range_and_bindable():
    low, high = ports.candidate_range(ports.ephemeral_range())
    seen = {ports.free_port() for _ in range(20)}
    for port in seen:
        if low:
            assert low <= port <= high, (port, low, high)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_someone_holds():
    low, high = ports.candidate_range(ports.ephemeral_range())
    if not low:
        pytest.skip("this kernel's ephemeral range leaves no other range")
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", ports.free_port()))
        held.listen()
        taken = held.getsockname()[1]
        other = ports.free_port(rng=_Scripted([taken, taken]))
        assert other != taken and low <= other <= high
    finally:
        held.close()
