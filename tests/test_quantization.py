"""Quantized checkpoints as published: block-wise FP8 (DeepSeek-V3 / Qwen3-FP8) and gpt-oss's MXFP4
experts. The dequantization against a per-block reference and transformers' own unpacking, the
config's errors, and whole models against transformers loading the same quantized files (its
FineGrainedFP8 / MXFP4 quantizers dequantize on a machine without FP8 / FP4 GEMMs)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import (build_hf_checkpoint, hf_greedy, hf_logits, load_ours, mxfp4_hf_checkpoint, our_greedy,
                          our_prefill_logits, quantize_hf_checkpoint)
from serving.model.checkpoint import write_checkpoint
from serving.model.moe import ExpertWeights
from serving.model.config import MoEConfig
from serving.model.quantization import (FP4_VALUES, SCALE_SUFFIX, FP8BlockQuant, FP8TensorQuant, MXFP4Quant,
                                        dequantize_fp8, dequantize_fp8_rows, dequantize_mxfp4, is_quantized_linear,
                                        quantize_fp8, quantize_mxfp4)
from serving.model.weights import CheckpointReader, load_expert

BLOCK = FP8BlockQuant(block_rows=8, block_cols=8)    # hf_reference's dims are multiples of 8 (but one)


def _per_block(fp8: torch.Tensor, scale: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """The definition, block by block (DeepSeek's weight_dequant kernel, partial edge blocks masked)."""
    out = torch.empty(fp8.shape)
    for i in range(math.ceil(fp8.shape[0] / br)):
        for j in range(math.ceil(fp8.shape[1] / bc)):
            rows, cols = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            out[rows, cols] = fp8[rows, cols].float() * float(scale[i, j])
    return out


@pytest.mark.parametrize("shape,block", [((37, 50), (16, 16)), ((576, 64), (128, 128)), ((24, 40), (8, 8))])
def test_dequantize_is_each_block_times_its_scale_partial_edges_included(shape, block):
    g = torch.Generator().manual_seed(0)
    q = FP8BlockQuant(block_rows=block[0], block_cols=block[1])
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[1])          # columns of mixed magnitude
    fp8, scale = quantize_fp8(w, q)
    assert fp8.dtype == torch.float8_e4m3fn and tuple(scale.shape) == q.scale_shape(shape)
    got = dequantize_fp8(fp8, scale, q)
    assert torch.equal(got, _per_block(fp8, scale, *block))
    # e4m3 keeps 3 mantissa bits: within 1/16 of each value, or one subnormal step of its block's scale
    step_RC = scale.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]] * 2 ** -9
    assert ((got - w).abs() <= w.abs() / 16 + step_RC).all()
    # a stack of matrices (fused expert tensors) dequantizes row by row of its first dim
    stacked = dequantize_fp8(torch.stack([fp8, fp8]), torch.stack([scale, 2 * scale]), q)
    assert torch.equal(stacked[0], got) and torch.equal(stacked[1], 2 * got)


def test_e8m0_exponent_scales_are_powers_of_two():
    q = FP8BlockQuant(block_rows=2, block_cols=2)
    fp8 = torch.ones(2, 4).to(torch.float8_e4m3fn)
    exponents = torch.tensor([[127 + 3, 127 - 1]], dtype=torch.uint8)        # 2^3, 2^-1
    assert dequantize_fp8(fp8, exponents, q).tolist() == [[8, 8, 0.5, 0.5]] * 2


def test_a_scale_grid_that_does_not_fit_the_weight_is_an_error():
    with pytest.raises(ValueError, match=r"scale grid \(2, 2\) does not fit a weight of shape \(20, 16\)"):
        dequantize_fp8(torch.zeros(20, 16).to(torch.float8_e4m3fn), torch.ones(2, 2), BLOCK)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be two integers"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "weight_block_size must be positive"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "fmt 'e5m2'"),
    ({"quant_method": "mxfp4"}, "'mxfp4' is supported for gpt_oss's fused experts only"),
])
def test_unsupported_quantization_configs_name_the_field(qc, match):
    hf = _mixtral_config()
    hf["quantization_config"] = qc
    with pytest.raises(ValueError, match=match):
        MoEConfig.from_hf_dict(hf)


def _mixtral_config() -> dict:
    return {"model_type": "mixtral", "vocab_size": 96, "hidden_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40,
            "num_local_experts": 4, "num_experts_per_tok": 2}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "qwen2_moe"])
def test_fp8_checkpoint_serves_what_transformers_serves_from_it(tmp_path, family):
    import transformers
    # transformers' dequantizer needs whole blocks: hf_reference's shared expert (44) made 48 here
    overrides = {"qwen2_moe": dict(shared_expert_intermediate_size=48)}.get(family, {})
    path, original = build_hf_checkpoint(tmp_path, family, **overrides)
    n = quantize_hf_checkpoint(path, BLOCK)
    names = load_file(path / "model.safetensors")
    assert n >= 8 and all(names[k[:-len(SCALE_SUFFIX)]].dtype == torch.float8_e4m3fn
                          for k in names if k.endswith(SCALE_SUFFIX))
    assert not any(is_quantized_linear(k, t) for k, t in names.items() if "gate.weight" in k or "embed" in k)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [5, 17, 3, 42, 8, 61, 29, 11, 70]
    ref = hf_logits(hf, ids)
    assert (ref - hf_logits(original, ids)).abs().max() > 1e-3     # the FP8 model is really another model
    model, dispatch = load_ours(path)
    assert model.config.quantization == BLOCK
    assert (our_prefill_logits(model, dispatch, ids) - ref).abs().max() < 1e-4
    assert our_greedy(model, dispatch, ids, 12) == hf_greedy(hf, ids, 12)


def test_an_fp8_tensor_without_its_scale_is_named(tmp_path):
    path, _ = build_hf_checkpoint(tmp_path, "mixtral")
    quantize_hf_checkpoint(path, BLOCK)
    tensors = load_file(path / "model.safetensors")
    gone = "model.layers.0.block_sparse_moe.experts.2.w1.weight" + SCALE_SUFFIX
    del tensors[gone]
    save_file(tensors, str(path / "model.safetensors"))
    config = MoEConfig.from_dir(path)
    with pytest.raises(ValueError, match=f"no tensor '{gone}'"):
        load_expert(CheckpointReader(path), config, 0, 2)
    load_expert(CheckpointReader(path), config, 0, 1)                # the others still load


def test_moe_serve_checkpoint_writes_fp8_weights_a_quarter_the_size(tmp_path):
    full = write_checkpoint("deepseek_v3", "tiny", tmp_path / "f32", seed=3)
    fp8 = write_checkpoint("deepseek_v3", "tiny", tmp_path / "fp8", seed=3, weights="fp8")
    cfg = MoEConfig.from_dir(fp8)
    assert cfg.quantization == FP8BlockQuant()
    a, b = CheckpointReader(full), CheckpointReader(fp8)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert b._raw(name, None).dtype == torch.float8_e4m3fn
    w, dq = a.get(name), b.get(name)
    assert dq.dtype == torch.float32 and 0 < (dq - w).abs().max() <= w.abs().max() / 16
    sizes = [sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (full, fp8)]
    # the projections are 1 byte a weight instead of 4; embeddings and lm_head stay fp32
    assert sizes[1] < 0.75 * sizes[0]


def test_mxfp4_dequantization_is_transformers_convert_moe_packed_tensors():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.uint8)   # E=3, R=10, 4 groups
    scales = torch.randint(110, 140, (3, 10, 4), generator=g, dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales)
    assert ours.shape == (3, 10, 128)
    assert torch.equal(ours.transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    # one value by hand: byte 0x7A of group 1 holds columns 32 + 2j (low nibble 0xA = -1.0) and 33 + 2j (0x7 = 6.0)
    blocks[0, 0, 1, 5], scales[0, 0, 1] = 0x7A, 127 + 2
    w = dequantize_mxfp4(blocks, scales)
    assert (w[0, 0, 42].item(), w[0, 0, 43].item()) == (-1.0 * 4, 6.0 * 4)


def test_mxfp4_quantization_keeps_each_value_within_half_an_fp4_step():
    w = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2))
    blocks, scales = quantize_mxfp4(w)
    back = dequantize_mxfp4(blocks, scales)
    step = (scales.float() - 127).exp2().repeat_interleave(32, -1)          # FP4 steps are <= 2 x the scale
    assert ((back - w).abs() <= step).all() and (back - w).abs().max() > 0
    exact = torch.tensor(FP4_VALUES * 2).view(1, 32) * 0.25                  # representable: kept exactly
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(exact)), exact)


def test_gpt_oss_mxfp4_checkpoint_serves_what_transformers_serves_from_it(tmp_path):
    import transformers
    path, original = build_hf_checkpoint(tmp_path, "gpt_oss", hidden_size=64, intermediate_size=64)
    mxfp4_hf_checkpoint(path)
    names = load_file(path / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names and "model.layers.0.mlp.experts.gate_up_proj" not in names
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [5, 17, 3, 42, 8, 61, 29, 11, 70, 4, 9]
    ref = hf_logits(hf, ids)
    assert (ref - hf_logits(original, ids)).abs().max() > 1e-3
    model, dispatch = load_ours(path)
    assert model.config.quantization == MXFP4Quant()
    assert (our_prefill_logits(model, dispatch, ids) - ref).abs().max() < 1e-4
    assert our_greedy(model, dispatch, ids, 12) == hf_greedy(hf, ids, 12)
    reader = CheckpointReader(path)        # one expert reads only its slice, as an expert shard does
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert name in reader and reader.shape(name) == (4, 64, 128)
    e: ExpertWeights = load_expert(reader, model.config, 1, 2)
    assert torch.equal(e.gate_ID, reader.get(name)[2][:, 0::2].T)


def test_moe_serve_checkpoint_writes_gpt_oss_with_mxfp4_experts(tmp_path):
    full = write_checkpoint("gpt_oss", "tiny", tmp_path / "f32", seed=4)
    mx = write_checkpoint("gpt_oss", "tiny", tmp_path / "mx", seed=4, weights="mxfp4")
    config = MoEConfig.from_dir(mx)
    assert config.quantization == MXFP4Quant()
    a, b = (load_expert(CheckpointReader(d), config, 1, 3) for d in (full, mx))
    for w, q in ((a.gate_ID, b.gate_ID), (a.down_DI, b.down_DI)):
        assert 0 < (q - w).abs().max() <= w.abs().max() / 3      # FP4: 1 mantissa bit, exponent per 32
    assert torch.equal(a.gate_bias_I, b.gate_bias_I)             # biases stay as they were
    with pytest.raises(ValueError, match="gpt_oss's format"):
        write_checkpoint("mixtral", "tiny", tmp_path / "bad", weights="mxfp4")


def test_per_tensor_and_per_row_fp8_as_vllm_writes_it(tmp_path):
    """quant_method "fp8" without weight_block_size (AutoFP8 / vLLM): `weight_scale` beside each FP8
    weight, one for the tensor (attention here) or one per output row (the experts here), and the
    static scheme's `input_scale`s, unused. Reference: transformers on the same weights dequantized
    by hand (fp8 x scale) into a plain checkpoint."""
    import shutil
    import transformers
    path, _ = build_hf_checkpoint(tmp_path / "fp8", "mixtral")
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    tensors, dequantized = load_file(path / "model.safetensors"), {}
    for name in [n for n, t in tensors.items() if is_quantized_linear(n, t)]:
        w = tensors.pop(name)
        per_row = ".experts." in name
        amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max().reshape(1)
        scale = amax / torch.finfo(torch.float8_e4m3fn).max
        tensors[name], tensors[name + "_scale"] = (w / scale).to(torch.float8_e4m3fn), scale
        tensors[name.removesuffix("weight") + "input_scale"] = torch.ones(1)
        dequantized[name] = tensors[name].float() * scale
    save_file(tensors, str(path / "model.safetensors"))
    save_file({**load_file(plain / "model.safetensors"), **dequantized}, str(plain / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (path / "config.json").write_text(json.dumps(cfg))

    hf = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    model, dispatch = load_ours(path)
    assert model.config.quantization == FP8TensorQuant()
    ids = [7, 3, 55, 21, 9, 80, 14]
    assert (our_prefill_logits(model, dispatch, ids) - hf_logits(hf, ids)).abs().max() < 1e-4
    assert our_greedy(model, dispatch, ids, 10) == hf_greedy(hf, ids, 10)
    del tensors["model.layers.1.self_attn.o_proj.weight_scale"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="no tensor 'model.layers.1.self_attn.o_proj.weight_scale'"):
        load_ours(path)
    with pytest.raises(ValueError, match=r"scale of shape \(3,\) fits neither"):
        dequantize_fp8_rows(torch.zeros(4, 2).to(torch.float8_e4m3fn), torch.ones(3))


def test_the_weights_format_labels_the_model_info_metric(tmp_path):
    from serving.deployments.config import AppConfig
    from serving.deployments.engine_replica import model_labels
    fp8 = write_checkpoint("qwen3_moe", "tiny", tmp_path / "q3-fp8", weights="fp8")
    labels = model_labels(AppConfig(checkpoint=str(fp8), dtype="bf16", expert_shards=3), MoEConfig.from_dir(fp8))
    assert labels == {"model": "q3-fp8", "family": "qwen3_moe", "dtype": "bf16", "weights": "fp8-block128x128",
                      "expert_shards": "3", "transport": "serve"}
    assert FP8TensorQuant().label == "fp8-tensor" and MXFP4Quant().label == "mxfp4"
