"""ServeTransport: shard calls go by value (gRPC data plane) unless MOE_SHARD_CALLS=by_reference.

A fake handle records the options it was given and answers like a shard; the real handles run in
the cluster tests (tests/test_cluster_e2e.py, tests/test_cluster_parity.py)."""
from __future__ import annotations

import torch

from serving.parallel.dispatcher import ShardCall
from serving.parallel.serve_transport import ServeTransport


class _Response:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _FakeHandle:
    def __init__(self, scale: float, options: dict | None = None):
        self.scale, self.opts = scale, options or {}
        self.forward = self

    def options(self, **kw):
        return _FakeHandle(self.scale, {**self.opts, **kw})

    def remote(self, layer, x_ND, ids_NK, weights_NK):
        return _Response(x_ND * self.scale + layer)


def _calls():
    x = torch.ones(3, 4)
    ids, w = torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2)
    return [ShardCall(1, x, ids, w), ShardCall(0, 2 * x, ids, w)]


def test_shard_calls_go_by_value_and_keep_call_order(monkeypatch):
    monkeypatch.delenv("MOE_SHARD_CALLS", raising=False)
    t = ServeTransport([_FakeHandle(10.0), _FakeHandle(100.0)])
    assert [h.opts for h in t.handles] == [{"_by_reference": False}] * 2
    y1, y0 = t.run(layer=5, calls=_calls())
    assert torch.equal(y1, torch.full((3, 4), 105.0)) and torch.equal(y0, torch.full((3, 4), 25.0))


def test_by_reference_is_an_explicit_opt_out(monkeypatch):
    monkeypatch.setenv("MOE_SHARD_CALLS", "by_reference")
    assert [h.opts for h in ServeTransport([_FakeHandle(1.0)]).handles] == [{}]
    monkeypatch.delenv("MOE_SHARD_CALLS")
    assert [h.opts for h in ServeTransport([_FakeHandle(1.0)], by_value=False).handles] == [{}]
