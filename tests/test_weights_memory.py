"""Fused weights are held once: the q/k/v and gate/up tensors a model keeps are views of the fused GEMM weight."""
from __future__ import annotations

import torch

from serving.model.checkpoint import write_checkpoint
from serving.model.config import MoEConfig
from serving.model.moe import ExpertWeights
from serving.model.weights import CheckpointReader, load_dense_weights, load_expert


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_expert_gate_and_up_are_views_of_the_fused_weight():
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(4, 6, generator=g)
    ew = ExpertWeights(gate_ID=gate.clone(), up_ID=up.clone(), down_DI=down)
    assert torch.equal(ew.gate_ID, gate) and torch.equal(ew.up_ID, up)        # same values ...
    assert _same_storage(ew.gate_ID, ew.gate_up.weight_OI)                    # ... held once
    assert _same_storage(ew.up_ID, ew.gate_up.weight_OI)
    x = torch.randn(3, 4, generator=g)
    torch.testing.assert_close(ew(x), (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T)


def test_loaded_checkpoint_keeps_one_plain_copy_of_fused_weights(tmp_path):
    ckpt = write_checkpoint("mixtral", "tiny", tmp_path / "ckpt")
    config = MoEConfig.from_dir(ckpt)
    reader = CheckpointReader(ckpt)
    dense = load_dense_weights(reader, config, torch.float32, "cpu")
    for lw in dense.layers:
        for w in (lw.wq, lw.wk, lw.wv):
            assert _same_storage(w, lw.qkv.weight_OI)
        torch.testing.assert_close(torch.cat((lw.wq, lw.wk, lw.wv)), lw.qkv.weight_OI, atol=0, rtol=0)
    ew = load_expert(reader, config, 1, 2)
    assert _same_storage(ew.gate_ID, ew.gate_up.weight_OI) and _same_storage(ew.up_ID, ew.gate_up.weight_OI)
