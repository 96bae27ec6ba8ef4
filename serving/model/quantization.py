"""Quantized checkpoints: FP8 weights with block-wise scales and gpt-oss's MXFP4 experts,
dequantized as they are read. No Ray.

DeepSeek-V3 / R1 and the Qwen3 "-FP8" checkpoints on the Hugging Face hub store most linear
weights as float8 (e4m3) with one fp32 scale per block of weight_block_size = [128, 128]:

    config.json:  "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                           "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    tensors:      <linear>.weight            float8_e4m3fn [R, C]
                  <linear>.weight_scale_inv  float32       [ceil(R / 128), ceil(C / 128)]

    weight[r, c] = fp8[r, c] * scale_inv[r // 128, c // 128]

(DeepSeek's `weight_dequant` kernel and transformers' FineGrainedFP8 `Fp8Dequantize`; the last
row / column of blocks may be partial: DeepSeek-V3's kv_a_proj_with_mqa has 576 rows = 4.5 blocks.)
What a checkpoint left in full precision (embeddings, norms, routers, lm_head) has no scale and
is read as it is.

We serve such a checkpoint in the engine's dtype (fp32 or bf16): each weight is dequantized when
it is read (`CheckpointReader.get`), one tensor at a time, so an expert shard still reads only its
own experts. Activations are not quantized (the `activation_scheme` and any static `input_scale`
tensors are unused): the served model is the checkpoint's weights exactly, computed in the serving
dtype, as transformers serves it on a machine without FP8 GEMMs. Scales may also be E8M0 exponents
(uint8 or float8_e8m0fnu: 2^(s - 127)), as MXFP8 checkpoints ship them.

`quantize_fp8` writes the format (tests; `moe-serve checkpoint --weights fp8`).

Without `weight_block_size`, quant_method "fp8" is vLLM's per-tensor format (AutoFP8's, e.g.
neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8): `<linear>.weight` float8 beside `<linear>.weight_scale`,
one fp32 multiplier for the tensor ([] or [1]) or one per output row ([R] or [R, 1]); the
`input_scale` tensors of its static activation scheme are unused here.

gpt-oss (openai/gpt-oss-20b / -120b) ships its routed experts in MXFP4 (OCP microscaling: FP4
e2m1 values in groups of 32 sharing one E8M0 exponent) and everything else in bf16:

    config.json:  "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [...]}
    tensors:      mlp.experts.gate_up_proj_blocks  uint8 [E, 2I, D / 32, 16]   two FP4 values a byte, low nibble first
                  mlp.experts.gate_up_proj_scales  uint8 [E, 2I, D / 32]       exponent + 127
                  mlp.experts.down_proj_blocks / _scales   [E, D, I / 32, 16] / [E, D, I / 32]

    W[e, r, 32 g + k] = FP4[nibble k of group g] * 2^(scales[e, r, g] - 127)        [E, rows, cols]

and the model's parameter is W transposed ([E, D, 2I] / [E, I, D]: gpt-oss computes x @ W), as
transformers' `convert_moe_packed_tensors` gives it. `CheckpointReader.get("...gate_up_proj", e)`
returns exactly that for expert e, reading only its slice of the blocks and scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_SUFFIX = "_scale_inv"          # <name>_scale_inv beside a block-wise quantized <name>
TENSOR_SCALE_SUFFIX = "_scale"       # <name>_scale beside a per-tensor / per-row quantized <name>
SUPPORTED_METHODS = ("fp8", "mxfp4")
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max        # 448


@dataclass(frozen=True, kw_only=True, slots=True)
class FP8BlockQuant:
    """A checkpoint's `quantization_config` for quant_method "fp8" (module doc)."""
    block_rows: int = 128
    block_cols: int = 128
    fmt: str = "e4m3"

    def __post_init__(self):
        if self.block_rows < 1 or self.block_cols < 1:
            raise ValueError(f"quantization_config.weight_block_size must be positive, got "
                             f"[{self.block_rows}, {self.block_cols}]")
        if self.fmt not in FP8_FORMATS:
            raise ValueError(f"quantization_config.fmt {self.fmt!r} is not supported (supported: "
                             f"{sorted(FP8_FORMATS)})")

    @classmethod
    def from_hf_dict(cls, qc: dict) -> "FP8BlockQuant":
        """From an "fp8" `quantization_config` with weight_block_size; ValueError naming the field."""
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) for b in block)):
            raise ValueError(f"quantization_config.weight_block_size must be two integers, got {block!r}")
        return cls(block_rows=block[0], block_cols=block[1], fmt=qc.get("fmt", "e4m3"))

    @property
    def label(self) -> str:
        return f"fp8-block{self.block_rows}x{self.block_cols}"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale grid of a weight of `shape` (leading dims: a stack of matrices)."""
        *lead, rows, cols = shape
        return (*lead, math.ceil(rows / self.block_rows), math.ceil(cols / self.block_cols))


@dataclass(frozen=True, kw_only=True, slots=True)
class FP8TensorQuant:
    """quant_method "fp8" without weight_block_size: one scale per tensor or per output row (module doc)."""
    fmt: str = "e4m3"

    def __post_init__(self):
        if self.fmt not in FP8_FORMATS:
            raise ValueError(f"quantization_config.fmt {self.fmt!r} is not supported (supported: "
                             f"{sorted(FP8_FORMATS)})")

    @property
    def label(self) -> str:
        return "fp8-tensor"


def dequantize_fp8_rows(weight_RC: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 weight [R, C] = fp8 [R, C] x its scale: one for the tensor ([] / [1]) or per row ([R] / [R, 1])."""
    R = weight_RC.shape[0]
    if scale.numel() == 1:
        return weight_RC.to(torch.float32) * scale.to(torch.float32).reshape(())
    if tuple(scale.shape) not in ((R,), (R, 1)):
        raise ValueError(f"scale of shape {tuple(scale.shape)} fits neither the whole weight nor each of its "
                         f"{R} rows (weight {tuple(weight_RC.shape)})")
    return weight_RC.to(torch.float32) * scale.to(torch.float32).reshape(R, 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class MXFP4Quant:
    """A checkpoint's `quantization_config` for quant_method "mxfp4" (gpt-oss; module doc)."""
    group: int = 32                      # FP4 values sharing one exponent (fixed by the OCP MX spec)

    @property
    def label(self) -> str:
        return "mxfp4"


WeightQuant = FP8BlockQuant | FP8TensorQuant | MXFP4Quant


def quantization_from_hf(qc: dict) -> WeightQuant:
    """config.json's `quantization_config` -> its format; ValueError naming the field if unsupported."""
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("weight_block_size") is None:
            return FP8TensorQuant(fmt=qc.get("fmt", "e4m3"))
        return FP8BlockQuant.from_hf_dict(qc)
    if method == "mxfp4":
        return MXFP4Quant()
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported (supported: "
                     f"{list(SUPPORTED_METHODS)}: FP8 block-wise as DeepSeek-V3 and Qwen3-FP8 ship it or per "
                     "tensor as vLLM / AutoFP8 write it, MXFP4 experts as gpt-oss ships them); serve a dequantized fp32/bf16/fp16 checkpoint")


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    """fp32 multipliers from stored scales: float as they are, E8M0 exponents as 2^(s - 127)."""
    if scale.dtype == torch.uint8 or scale.dtype == getattr(torch, "float8_e8m0fnu", None):
        return (scale.view(torch.uint8).to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def dequantize_fp8(weight_RC: torch.Tensor, scale_inv: torch.Tensor, q: FP8BlockQuant) -> torch.Tensor:
    """fp32 weight [..., R, C] = fp8 [..., R, C] x its block's scale [..., ceil(R/br), ceil(C/bc)]."""
    *lead, R, C = weight_RC.shape
    expected = q.scale_shape(tuple(weight_RC.shape))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not fit a weight of shape "
                         f"{tuple(weight_RC.shape)} in blocks of [{q.block_rows}, {q.block_cols}] "
                         f"(expected {expected})")
    s = _scale_values(scale_inv)
    s_RC = s.repeat_interleave(q.block_rows, dim=-2)[..., :R, :].repeat_interleave(q.block_cols, dim=-1)[..., :C]
    return weight_RC.to(torch.float32) * s_RC


def quantize_fp8(weight_RC: torch.Tensor, q: FP8BlockQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [R, C], scale_inv [ceil(R/br), ceil(C/bc)] fp32): each block scaled so its largest
    magnitude maps to FP8's largest (448), as DeepSeek's and transformers' quantizers do."""
    R, C = weight_RC.shape
    br, bc = q.block_rows, q.block_cols
    nr, nc = math.ceil(R / br), math.ceil(C / bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32)
    padded[:R, :C] = weight_RC.float()
    blocks = padded.view(nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)            # [nr, nc]
    scale_inv = amax / FP8_MAX
    fp8 = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_FORMATS[q.fmt])
    return fp8.view(nr * br, nc * bc)[:R, :C].contiguous(), scale_inv


def is_quantized_linear(name: str, t: torch.Tensor) -> bool:
    """The weights block-wise FP8 checkpoints quantize: the 2-D attention / MLP / expert
    projections (`*_proj.weight`, Mixtral's `w1` / `w2` / `w3`); embeddings, lm_head, norms and
    routers (`gate`, `router`, `shared_expert_gate`) stay in full precision, as in DeepSeek-V3."""
    return t.dim() == 2 and (name.endswith("_proj.weight") or name.endswith((".w1.weight", ".w2.weight",
                                                                              ".w3.weight")))


def quantize_tensors(tensors: dict[str, torch.Tensor], q: FP8BlockQuant) -> dict[str, torch.Tensor]:
    """A state dict with every `is_quantized_linear` weight as FP8 plus its `<name>_scale_inv`."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if is_quantized_linear(name, t):
            out[name], out[name + SCALE_SUFFIX] = quantize_fp8(t, q)
        else:
            out[name] = t
    return out


def hf_quantization_config(q: FP8BlockQuant) -> dict:
    """config.json's `quantization_config` for `q` (as DeepSeek-V3's)."""
    return {"quant_method": "fp8", "fmt": q.fmt, "activation_scheme": "dynamic",
            "weight_block_size": [q.block_rows, q.block_cols]}


MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"     # <param>_blocks / <param>_scales stand for <param>
# FP4 e2m1: sign bit, 2 exponent bits, 1 mantissa bit (the 16 values by nibble)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks_RGb: torch.Tensor, scales_RG: torch.Tensor) -> torch.Tensor:
    """fp32 W [..., R, G*32] from packed FP4 bytes [..., R, G, 16] (low nibble = even column) and
    E8M0 exponents [..., R, G]: each value x 2^(exponent - 127). Transpose for gpt-oss's x @ W."""
    if tuple(blocks_RGb.shape[:-1]) != tuple(scales_RG.shape) or blocks_RGb.shape[-1] * 2 != MXFP4Quant().group:
        raise ValueError(f"MXFP4 blocks {tuple(blocks_RGb.shape)} and scales {tuple(scales_RG.shape)} do not "
                         f"match (expected blocks [..., R, G, 16] beside scales [..., R, G])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks_RGb.view(torch.uint8)
    values = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1)      # [..., R, G, 16, 2]
    values = values.flatten(-3)                                                        # [..., R, G*32]
    scale = (scales_RG.view(torch.uint8).to(torch.float32) - 127.0).exp2()            # [..., R, G]
    return (values.unflatten(-1, (scales_RG.shape[-1], -1)) * scale[..., None]).flatten(-2)


def quantize_mxfp4(w_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [..., R, C/32, 16] uint8, scales [..., R, C/32] uint8) of W [..., R, C]: each group's
    exponent the smallest that keeps its largest magnitude within FP4's 6, values rounded to the
    nearest FP4 value (ties to the lower index)."""
    group = MXFP4Quant().group
    if w_RC.shape[-1] % group:
        raise ValueError(f"MXFP4 needs columns in whole groups of {group}, got {w_RC.shape[-1]}")
    g = w_RC.float().unflatten(-1, (-1, group))                                          # [..., R, G, 32]
    amax = g.abs().amax(-1).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)                            # [..., R, G]
    scaled = g / exp.exp2()[..., None]
    lut = torch.tensor(FP4_VALUES[:8], dtype=torch.float32)
    mag = (scaled.abs()[..., None] - lut).abs().argmin(-1)                              # nearest magnitude
    nibble = (mag + 8 * (scaled < 0)).to(torch.uint8)                                   # [..., R, G, 32]
    packed = nibble[..., 0::2] | (nibble[..., 1::2] << 4)
    return packed, (exp + 127).to(torch.uint8)


def mxfp4_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gpt_oss state dict with its fused expert weights (`experts.gate_up_proj` [E, D, 2I],
    `experts.down_proj` [E, I, D]) as MXFP4 blocks and scales of their transposes, as
    openai/gpt-oss ships them; D and I must be multiples of 32."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name + MXFP4_BLOCKS], out[name + MXFP4_SCALES] = quantize_mxfp4(t.transpose(-1, -2))
        else:
            out[name] = t
    return out


# gpt-oss's own quantization_config (what stays bf16 is listed; only the experts are MXFP4)
GPT_OSS_MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
