"""Dense building blocks: RMSNorm, rotary embedding, batched attention (GQA and MLA) over the KV cache.

Op order follows transformers 5.24 per family so fp32 logits match to ~1e-6.
Shape legend: T new tokens (all sequences concatenated), B sequences, Q longest new-token run,
C context (longest sequence incl. new tokens, rounded up to whole KV blocks), D hidden, H query heads, Hkv KV heads, hd head_dim,
R MLA kv_lora_rank, dn / dr / dv MLA nope / rope / value head dims.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from serving.model.config import MoEConfig, RopeConfig
from serving.model.kv_cache import KVCache
from serving.model.linear import native_cpu_gemm
from serving.model.moe import ExpertWeights

MLA_NORM_EPS = 1e-6   # transformers builds DeepSeek's q_a_layernorm / kv_a_layernorm with the RMSNorm default eps


def rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back, then scale (HF order). A fp32 weight on low-precision activations
    (gpt_oss keeps its norms fp32) scales in fp32 first and then casts, as transformers does there."""
    x = x_TD.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight_D.dtype == torch.float32 and x_TD.dtype != torch.float32:
        return (weight_D * x).to(x_TD.dtype)
    return weight_D * x.to(x_TD.dtype)


def swiglu(x_TD: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)): dense MLP layers and the shared expert."""
    return w(x_TD)


class RotaryEmbedding:
    """RoPE with HF's rotate_half layout: default, yarn (scaled frequencies + cos/sin scale) or HunYuan ntk_alpha."""

    def __init__(self, head_dim: int, theta: float, device: str | torch.device = "cpu",
                 rope: RopeConfig | None = None):
        rope = rope or RopeConfig(theta=theta, dim=head_dim)
        self.interleave, self.attention_scaling = rope.interleave, rope.attention_factor
        dim, base = rope.dim, rope.theta
        if rope.rope_type == "ntk_alpha":
            base = base * rope.alpha ** (dim / (dim - 2))
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
        inv_freq = 1.0 / pos_freqs
        if rope.rope_type == "yarn":   # transformers `_compute_yarn_parameters`
            def correction_dim(rotations: float) -> float:
                return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
                        ) / (2 * math.log(base))
            low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
            if rope.truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            if low == high:
                high += 0.001
            ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
            extrapolation = 1 - ramp
            inv_freq = (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation
        elif rope.rope_type not in ("default", "ntk_alpha"):
            raise ValueError(f"unsupported rope_type {rope.rope_type!r}")
        self.inv_freq = inv_freq.to(device)

    @classmethod
    def from_config(cls, config: MoEConfig, device: str | torch.device = "cpu") -> "RotaryEmbedding":
        return cls(config.rope.dim, config.rope.theta, device, config.rope)

    def cos_sin(self, pos_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_Th = pos_T[:, None].float() * self.inv_freq
        emb_Thd = torch.cat((freqs_Th, freqs_Th), dim=-1)
        return (emb_Thd.cos() * self.attention_scaling).to(dtype), (emb_Thd.sin() * self.attention_scaling).to(dtype)


def apply_rope(x_THd: torch.Tensor, cos_Thd: torch.Tensor, sin_Thd: torch.Tensor,
               interleave: bool = False) -> torch.Tensor:
    """rotate_half RoPE. `interleave` (DeepSeek) first de-interleaves pairs (x0,x1),(x2,x3).. into halves,
    which is exactly transformers' `apply_rotary_pos_emb_interleave` (its output is in half layout too)."""
    if interleave:
        x_THd = torch.cat((x_THd[..., 0::2], x_THd[..., 1::2]), dim=-1)
    x1, x2 = x_THd.chunk(2, dim=-1)
    return x_THd * cos_Thd[:, None] + torch.cat((-x2, x1), dim=-1) * sin_Thd[:, None]


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Index tensors for one engine step, shared by every layer (nb = ceil(C / block_size))."""
    block_T: torch.Tensor       # KV-cache block holding each new token ...
    offset_T: torch.Tensor      # ... and its offset in that block
    pos_T: torch.Tensor         # its position in its sequence
    table_Bn: torch.Tensor      # each sequence's first nb blocks (padded with block 0, masked)
    # the padded layout, for the step attending as one group (None in a mixed step: its parts have it)
    pad_index_BQ: torch.Tensor | None   # token index feeding each padded query row (0 for padding)
    unpad_index_T: torch.Tensor | None  # row of the flattened [B*Q] padded layout holding each token
    mask_B1QC: torch.Tensor | None      # True = may attend (causal, per-sequence length, sliding window)
    ctx_len: int                # C: the longest sequence's tokens, rounded up to whole blocks
    qpos_BQ: torch.Tensor | None = None   # position of each padded query row
    # decode-only steps (Q = 1): the mask as an additive fp32 bias (0 / -inf), made once per step
    decode_bias_B1C: torch.Tensor | None = None
    # decode-only steps whose sequences all begin with the same cached KV blocks (prefix caching: a
    # shared system prompt): those blocks' ids [S]. Attention reads them once for every sequence
    # (decode_attention's `prefix`) instead of gathering a copy per sequence; None: no such blocks.
    shared_blocks_S: torch.Tensor | None = None
    # steps whose sequences attend in groups (`attention_groups`), each with its own metadata, as
    # (token indices idx_t, metadata of those sequences); else ().
    parts: tuple[tuple[torch.Tensor, "AttentionMetadata"], ...] = ()

    @classmethod
    def build(cls, block_tables: tuple[tuple[int, ...], ...], start_pos: tuple[int, ...], q_lens: tuple[int, ...],
              sliding_window: int | None, block_size: int, device: str | torch.device = "cpu"
              ) -> "AttentionMetadata":
        B, Q = len(q_lens), max(q_lens)
        nb = -(-max(s + q for s, q in zip(start_pos, q_lens)) // block_size)
        # C covers whole blocks: the gathered K/V is then [Hkv, B, C, hd] with no slicing, so decode
        # attention's per-head operands are views of it; the causal mask hides positions past each end
        C = nb * block_size
        for tbl, s, q in zip(block_tables, start_pos, q_lens):
            if len(tbl) * block_size < s + q:
                raise ValueError(f"block table of {len(tbl)} blocks cannot hold {s + q} tokens")
        table_Bn = torch.tensor([tuple(t[:nb]) + (0,) * (nb - min(nb, len(t))) for t in block_tables],
                                dtype=torch.int64, device=device)
        q_lens_B = torch.tensor(q_lens, device=device)
        start_B = torch.tensor(start_pos, device=device)
        seq_T = torch.repeat_interleave(torch.arange(B, device=device), q_lens_B)
        first_T = torch.cumsum(q_lens_B, 0)[seq_T] - q_lens_B[seq_T]
        offset_T = torch.arange(len(seq_T), device=device) - first_T   # index within its sequence's new tokens
        pos_T = start_B[seq_T] + offset_T
        block_T, in_block_T = table_Bn[seq_T, pos_T // block_size], pos_T % block_size
        groups = attention_groups(q_lens, None if sliding_window else decode_prefix_keys(
            block_tables, start_pos, q_lens, block_size))
        if groups is not None:                      # no padded layout for the whole step: its groups have one each
            parts = []
            for group in groups:
                member_B = torch.zeros(B, dtype=torch.bool, device=device)
                member_B[group] = True
                sub = cls.build(tuple(block_tables[b] for b in group), tuple(start_pos[b] for b in group),
                                tuple(q_lens[b] for b in group), sliding_window, block_size, device)
                parts.append((member_B[seq_T].nonzero().flatten(), sub))
            return cls(block_T=block_T, offset_T=in_block_T, pos_T=pos_T, table_Bn=table_Bn,
                       pad_index_BQ=None, unpad_index_T=None, mask_B1QC=None, ctx_len=C, parts=tuple(parts))
        ar_Q = torch.arange(Q, device=device)
        valid_BQ = ar_Q[None] < q_lens_B[:, None]
        pad_index_BQ = torch.where(valid_BQ, (torch.cumsum(q_lens_B, 0) - q_lens_B)[:, None] + ar_Q[None], 0)
        qpos_BQ = start_B[:, None] + ar_Q[None]
        kpos_C = torch.arange(C, device=device)
        mask_BQC = kpos_C[None, None] <= qpos_BQ[:, :, None]
        if sliding_window:
            mask_BQC &= kpos_C[None, None] > qpos_BQ[:, :, None] - sliding_window
        shared = 0 if Q > 1 or sliding_window else shared_prefix_blocks(block_tables, start_pos, q_lens, block_size)
        return cls(block_T=block_T, offset_T=in_block_T, pos_T=pos_T,
                   table_Bn=table_Bn, pad_index_BQ=pad_index_BQ, unpad_index_T=seq_T * Q + offset_T,
                   mask_B1QC=mask_BQC[:, None], ctx_len=C, qpos_BQ=qpos_BQ, decode_bias_B1C=_decode_bias(mask_BQC),
                   shared_blocks_S=table_Bn[0, :shared] if shared else None)

    @property
    def decode_only(self) -> bool:
        """Every sequence brings exactly one new token (Q = 1, T = B, the padded layout is the identity)."""
        return self.decode_bias_B1C is not None

    def with_window(self, window: int | None) -> "AttentionMetadata":
        """The same step with a sliding window applied on top of this mask (None: unchanged)."""
        if not window:
            return self
        if self.parts:
            return replace(self, parts=tuple((idx_t, sub.with_window(window)) for idx_t, sub in self.parts))
        if self.decode_only and (windowed := self._decode_window(window)) is not None:
            return windowed
        kpos_C = torch.arange(self.ctx_len, device=self.mask_B1QC.device)
        in_window_BQC = kpos_C[None, None] > self.qpos_BQ[:, :, None] - window
        mask_BQC = self.mask_B1QC[:, 0] & in_window_BQC
        return replace(self, mask_B1QC=mask_BQC[:, None], decode_bias_B1C=_decode_bias(mask_BQC),
                       shared_blocks_S=None)     # a window may leave part of the shared blocks behind

    def _decode_window(self, window: int) -> "AttentionMetadata | None":
        """A decode-only step under a sliding window reads only the KV blocks the window covers: each
        sequence's table from the block holding its position - window + 1, NB blocks (the most any
        sequence's window spans), its mask over those positions. None when that is not fewer blocks
        than the whole context (every sequence shorter than the window, or about as long).
        gpt-oss's 128-token windows at a 4k context: 9 of 256 blocks gathered and attended per layer."""
        B, nb = self.table_Bn.shape
        bs = self.ctx_len // nb
        pos_B = self.qpos_BQ[:, 0]
        first_B = (pos_B - window + 1).clamp(min=0) // bs
        last_B = pos_B // bs
        NB = int((last_B - first_B).max()) + 1
        if NB >= nb:
            return None
        blk_BN = first_B[:, None] + torch.arange(NB, device=pos_B.device)[None]       # index into each table
        table_BN = torch.where(blk_BN <= last_B[:, None], self.table_Bn.gather(1, blk_BN.clamp(max=nb - 1)), 0)
        kpos_BC = first_B[:, None] * bs + torch.arange(NB * bs, device=pos_B.device)[None]   # absolute positions
        mask_BQC = ((kpos_BC <= pos_B[:, None]) & (kpos_BC > pos_B[:, None] - window))[:, None]
        return replace(self, table_Bn=table_BN, ctx_len=NB * bs, mask_B1QC=mask_BQC[:, None],
                       decode_bias_B1C=_decode_bias(mask_BQC), shared_blocks_S=None)

    def read_decode_kv(self, kv: KVCache, layer: int):
        """A decode-only step's cached K/V: (k, v) of every sequence's context past the shared blocks
        [B, G, C', *] (all of it without shared blocks), the bias over those positions [B, 1, C'], and
        the shared blocks' (k, v) [G, P, *] read once (None without shared blocks)."""
        if self.shared_blocks_S is None:
            return *kv.read(layer, self.table_Bn, self.ctx_len), self.decode_bias_B1C, None
        S = self.shared_blocks_S.numel()
        P = S * kv.block_size
        k, v = kv.read(layer, self.table_Bn[:, S:], self.ctx_len - P)
        return k, v, self.decode_bias_B1C[..., P:], kv.read_blocks(layer, self.shared_blocks_S)


def attend_split(q_T: torch.Tensor, meta: AttentionMetadata, attend) -> torch.Tensor:
    """attend(q_T, meta) -> o_T, run per group of a mixed step (meta.parts) and scattered back in token
    order; a step that is all decode or all prefill runs as one group."""
    if not meta.parts:
        return attend(q_T, meta)
    outs = [(idx_t, attend(q_T[idx_t], sub)) for idx_t, sub in meta.parts]
    o_T = outs[0][1].new_empty((q_T.shape[0], *outs[0][1].shape[1:]))
    for idx_t, o_t in outs:
        o_T[idx_t] = o_t
    return o_T


def decode_prefix_keys(block_tables: tuple[tuple[int, ...], ...], start_pos: tuple[int, ...],
                       q_lens: tuple[int, ...], block_size: int) -> list[tuple[int, ...] | None]:
    """Per sequence, its first MIN_SHARED_BLOCKS block ids where they lie wholly before its last
    token (what sequences sharing a cached prefix have in common), else None."""
    return [tuple(t[:MIN_SHARED_BLOCKS]) if (s + q - 1) // block_size >= MIN_SHARED_BLOCKS else None
            for t, s, q in zip(block_tables, start_pos, q_lens)]


def attention_groups(q_lens: tuple[int, ...], prefix_keys: list[tuple[int, ...] | None] | None = None
                     ) -> list[list[int]] | None:
    """The sequences of a step that attend together, so that no group pads its queries to more
    than twice their tokens, and decoding sequences that share cached prefix blocks attend apart
    from the others (see below); None when the whole step is one group.

    Decodes sharing their first blocks (`prefix_keys`, from decode_prefix_keys: tenants or
    products each with their own system prompt) form a group each, of MIN_GROUP_SEQS or more,
    so that each group reads its shared blocks once (decode_attention's `prefix`); the other
    decodes attend together as before.

    Prefill chunks attend through one SDPA over queries padded to the group's longest chunk, and
    decoding sequences through decode_attention. One padded SDPA over a mixed step would pad every
    decoding sequence to the longest chunk (63 decodes + one 32-token chunk: 2016 query rows for 95
    tokens; a 27 ms decode step took 50-80 ms), and one over 28 prompts of 64 tokens behind a
    256-token chunk pads them 4x (that step: 0.42 s against 0.24 s for as many tokens). So decodes are
    a group, and chunks are grouped by length, (2^(k-1), 2^k] each, when padding them together would
    more than double their rows."""
    decodes = [b for b, q in enumerate(q_lens) if q == 1]
    chunks = [b for b, q in enumerate(q_lens) if q > 1]
    groups = _decode_groups(decodes, prefix_keys) if decodes else []
    if chunks:
        longest, rows = max(q_lens[b] for b in chunks), sum(q_lens[b] for b in chunks)
        if len(chunks) * longest <= 2 * rows:
            groups.append(chunks)
        else:
            by_size: dict[int, list[int]] = {}
            for b in chunks:
                by_size.setdefault((q_lens[b] - 1).bit_length(), []).append(b)
            groups += [by_size[k] for k in sorted(by_size)]
    return groups if len(groups) > 1 else None


# A group of decoding sequences sharing prefix blocks attends on its own from this many sequences
# (below it, its own gather and GEMMs cost more than reading the blocks once saves)
MIN_GROUP_SEQS = 4


def _decode_groups(decodes: list[int], prefix_keys: list[tuple[int, ...] | None] | None) -> list[list[int]]:
    if prefix_keys is None:
        return [decodes]
    by_key: dict[tuple[int, ...], list[int]] = {}
    for b in decodes:
        if prefix_keys[b] is not None:
            by_key.setdefault(prefix_keys[b], []).append(b)
    shared = [g for g in by_key.values() if len(g) >= MIN_GROUP_SEQS]
    if len(shared) == 1 and len(shared[0]) == len(decodes) or not shared:
        return [decodes]
    members = {b for g in shared for b in g}
    rest = [b for b in decodes if b not in members]
    return shared + ([rest] if rest else [])


# Below this many shared blocks the step reads every sequence's context the plain way: the shared
# part's own GEMMs and the merge cost more than a short gather saves. One decode layer, 64 sequences
# with 5 blocks of 16 of their own, fp32, 2 threads (two runs): with 1 / 2 / 4 / 8 / 32 shared blocks
# the plain way took 0.26-0.30 / 0.28-0.31 / 0.36-0.38 / 0.47-0.52 / 1.74-1.86 ms, reading the shared
# blocks once 0.31-0.38 / 0.31-0.39 / 0.36-0.43 / 0.49-0.51 / 0.88-0.90 ms.
MIN_SHARED_BLOCKS = 8


def shared_prefix_blocks(block_tables: tuple[tuple[int, ...], ...], start_pos: tuple[int, ...],
                         q_lens: tuple[int, ...], block_size: int) -> int:
    """How many leading KV blocks every sequence of the step holds in common (the same block ids:
    prefix-cache sharing), counting only blocks wholly before each sequence's last token, so every
    sequence keeps at least that token outside them; 0 below MIN_SHARED_BLOCKS or for one sequence."""
    if len(block_tables) < 2:
        return 0
    limit, first = min((s + q - 1) // block_size for s, q in zip(start_pos, q_lens)), block_tables[0]
    n = 0                                # every decode step asks: most differ at block 0, so stop at the first
    while n < limit and all(t[n] == first[n] for t in block_tables):
        n += 1
    return n if n >= MIN_SHARED_BLOCKS else 0


def _decode_bias(mask_BQC: torch.Tensor) -> torch.Tensor | None:
    """For a decode-only step (Q = 1) the additive fp32 form of the mask [B, 1, C]; else None."""
    if mask_BQC.shape[1] != 1:
        return None
    return torch.zeros(mask_BQC.shape, dtype=torch.float32, device=mask_BQC.device).masked_fill_(
        ~mask_BQC, float("-inf"))


def attention(x_TD: torch.Tensor, lw, layer: int, cos_Thd: torch.Tensor, sin_Thd: torch.Tensor,
              meta: AttentionMetadata, kv: KVCache, config: MoEConfig) -> torch.Tensor:
    """GQA self-attention for a mixed prefill/decode batch: write new K/V, then the decoding sequences
    attend with `decode_attention` and the prefilling ones with one SDPA over their padded queries.

    Family switches: q/k RMSNorm (per head before / after rope, or over the whole projection),
    clip_qkv, o_proj bias, and attention sinks.
    """
    c, T, hd, eps = config, x_TD.shape[0], config.head_dim, config.rms_norm_eps
    q_TX, k_TX, v_TX = lw.qkv(x_TD).split((lw.wq.shape[0], lw.wk.shape[0], lw.wv.shape[0]), dim=-1)
    if c.qk_norm == "full":   # olmoe: over all heads at once
        q_TX, k_TX = rms_norm(q_TX, lw.q_norm, eps), rms_norm(k_TX, lw.k_norm, eps)
    if c.clip_qkv is not None:
        q_TX, k_TX, v_TX = (t.clamp(min=-c.clip_qkv, max=c.clip_qkv) for t in (q_TX, k_TX, v_TX))
    q_THd, k_THd, v_THd = q_TX.view(T, -1, hd), k_TX.view(T, -1, hd), v_TX.view(T, -1, hd)
    if c.qk_norm == "head":
        q_THd, k_THd = rms_norm(q_THd, lw.q_norm, eps), rms_norm(k_THd, lw.k_norm, eps)
    q_THd, k_THd = apply_rope(q_THd, cos_Thd, sin_Thd), apply_rope(k_THd, cos_Thd, sin_Thd)
    if c.qk_norm == "head_after_rope":   # hunyuan
        q_THd, k_THd = rms_norm(q_THd, lw.q_norm, eps), rms_norm(k_THd, lw.k_norm, eps)
    kv.write(layer, meta.block_T, meta.offset_T, k_THd, v_THd)
    return lw.o(attend_split(q_THd, meta, lambda q, m: _attend_gqa(q, m, kv, layer, lw.sinks, hd)).flatten(1))


def _attend_gqa(q_THd: torch.Tensor, meta: AttentionMetadata, kv: KVCache, layer: int,
                sinks: torch.Tensor | None, hd: int) -> torch.Tensor:
    """Queries of one group's tokens over their sequences' cached K/V -> o_THd."""
    if meta.decode_only and sinks is None:
        k_BHCd, v_BHCd, bias_B1C, shared = meta.read_decode_kv(kv, layer)
        return decode_attention(q_THd, k_BHCd, v_BHCd, bias_B1C, hd ** -0.5, prefix=shared)
    k_BHCd, v_BHCd = kv.read(layer, meta.table_Bn, meta.ctx_len)
    q_BHQd = q_THd[meta.pad_index_BQ].transpose(1, 2)
    mask = meta.mask_B1QC
    if sinks is not None:
        # A sink is one extra softmax column per head: a virtual key with q.k = 0 and v = 0 whose additive
        # bias is the head's sink logit, so exp(sink) joins only the denominator (transformers drops it after).
        B, Hkv, C, _ = k_BHCd.shape
        H, Q = q_BHQd.shape[1], q_BHQd.shape[2]
        k_BHCd = torch.cat((k_BHCd, k_BHCd.new_zeros(B, Hkv, 1, hd)), dim=2)
        v_BHCd = torch.cat((v_BHCd, v_BHCd.new_zeros(B, Hkv, 1, hd)), dim=2)
        bias = torch.zeros(B, H, Q, C + 1, dtype=q_BHQd.dtype, device=q_BHQd.device)
        bias[..., :C].masked_fill_(~mask, float("-inf"))
        bias[..., C] = sinks[None, :, None].to(q_BHQd.dtype)
        mask = bias
    o_BHQd = F.scaled_dot_product_attention(q_BHQd, k_BHCd, v_BHCd, attn_mask=mask, scale=hd ** -0.5,
                                            enable_gqa=True)
    return o_BHQd.transpose(1, 2).flatten(0, 1)[meta.unpad_index_T]


def decode_attention(q_BHk: torch.Tensor, k_BGCk: torch.Tensor, v_BGCv: torch.Tensor, bias_B1C: torch.Tensor,
                     scale: float, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention for one query row per sequence (a decode step) with G KV heads (GQA; MLA: G = 1,
    k = [latent, k_pe], v = latent): two batched GEMMs over the X = G*B (KV head, sequence) pairs,
    each with its N = H/G query heads, softmax in fp32 -> o_BHv (k, v: key and value dims).
    bias_B1C is the step's mask as 0 / -inf (AttentionMetadata.decode_bias_B1C).

    The same math as SDPA, which on CPU pays per (sequence, head) for a single query row: for 64
    sequences x 8 heads, ~100 cached tokens, 0.5 ms a layer in fp32 and 2.7 ms in bf16; this path
    0.3 ms in fp32 and 0.2 ms in bf16. K/V come from the head-major cache (kv_cache.py) as views of
    one [G, B, C, k] gather, so the [X, C, k] operands are views: nothing more is copied.
    A bf16 / fp16 cache runs both GEMMs in its own dtype (fp32 accumulation inside the GEMM, scores
    rounded to it, as transformers' eager attention does): upcasting K/V to fp32 first cost ~1 ms a
    layer at that size alone (timed inside bf16 decode steps: 4.2-4.5 ms of a 27-29 ms step, 4 layers).
    That holds where the CPU runs bf16 GEMMs natively (AVX512-BF16 / AMX); on AVX2 alone torch's
    half bmm is a slow scalar path, so there q, K and V are upcast and the fp32 path runs, the
    output rounded back (64 x 64 bf16 run on a 2-core AVX2 EPYC: the dense phase 1.85 s against
    3.59 s in bf16, 515 against 415 tok/s).

    `prefix` = (k_GPk, v_GPv): P more positions that every sequence attends to, before its own C
    (the KV blocks all of them share: a cached system prompt), read once instead of once per
    sequence. Their scores are one GEMM per KV head over all B x N query rows, and the two parts
    are merged under one softmax (shared row maximum, summed denominators): the same attention
    ("cascade" attention) up to float reassociation.
    """
    if k_BGCk.device.type == "cpu" and not native_cpu_gemm(k_BGCk.dtype):     # AVX2: upcast (docstring)
        up = None if prefix is None else (prefix[0].float(), prefix[1].float())
        return decode_attention(q_BHk.float(), k_BGCk.float(), v_BGCv.float(), bias_B1C, scale,
                                prefix=up).to(q_BHk.dtype)
    B, H, dk = q_BHk.shape
    G, C, dv = k_BGCk.shape[1], k_BGCk.shape[2], v_BGCv.shape[3]
    dtype = k_BGCk.dtype
    k_XCk = k_BGCk.transpose(0, 1).reshape(G * B, C, dk)          # views of the head-major gather
    v_XCv = v_BGCv.transpose(0, 1).reshape(G * B, C, dv)
    q_XNk = q_BHk.to(dtype).view(B, G, H // G, dk).transpose(0, 1).reshape(G * B, H // G, dk)
    bias_X1C = bias_B1C[None].expand(G, B, 1, C).reshape(G * B, 1, C)
    if dtype == torch.float32:
        scores_XNC = torch.baddbmm(bias_X1C, q_XNk, k_XCk.transpose(1, 2), alpha=scale)
    else:
        scores_XNC = torch.bmm(q_XNk, k_XCk.transpose(1, 2)).float().mul_(scale).add_(bias_X1C)
    if prefix is None:
        o_XNv = torch.bmm(scores_XNC.softmax(dim=-1).to(dtype), v_XCv)
    else:
        k_GPk, v_GPv = prefix
        N, P = H // G, k_GPk.shape[1]
        q_GMk = q_XNk.reshape(G, B * N, dk)                        # M = B*N query rows per KV head
        scores_XNP = torch.bmm(q_GMk, k_GPk.transpose(1, 2)).float().mul_(scale).view(G * B, N, P)
        max_XN1 = torch.maximum(scores_XNC.amax(-1, keepdim=True), scores_XNP.amax(-1, keepdim=True))
        e_XNC, e_XNP = (scores_XNC - max_XN1).exp_(), (scores_XNP - max_XN1).exp_()
        denom_XN1 = e_XNC.sum(-1, keepdim=True) + e_XNP.sum(-1, keepdim=True)
        o_GMv = torch.bmm(e_XNP.view(G, B * N, P).to(dtype), v_GPv)
        o_XNv = ((torch.bmm(e_XNC.to(dtype), v_XCv).float() + o_GMv.view(G * B, N, dv).float())
                 / denom_XN1).to(dtype)
    return o_XNv.view(G, B, H // G, dv).transpose(0, 1).reshape(B, H, dv).to(q_BHk.dtype)


def mla_attention(x_TD: torch.Tensor, lw, layer: int, cos_Thd: torch.Tensor, sin_Thd: torch.Tensor,
                  meta: AttentionMetadata, kv: KVCache, config: MoEConfig) -> torch.Tensor:
    """DeepSeek multi-head latent attention over a cache of (normed latent [R], rope'd k_pe [dr]) per token.

    The up-projection kv_b_proj = [W_uk; W_uv] per head is absorbed instead of expanding the cache:
      score(q, j) = (q_nope W_uk) . latent_j + q_pe . k_pe_j      (one shared "KV head" of width R + dr)
      out         = (sum_j p_j latent_j) W_uv^T                    (values are the latents themselves)
    which equals transformers' expand-then-attend up to float reassociation.
    """
    m, T, H = config.mla, x_TD.shape[0], config.num_heads
    dn, dr, dv, R = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    mw = lw.mla
    if mw.wq is not None:
        q_TX = F.linear(x_TD, mw.wq)
    else:
        q_TX = F.linear(rms_norm(F.linear(x_TD, mw.wq_a, mw.bq_a), mw.q_a_norm, MLA_NORM_EPS), mw.wq_b)
    q_nope_THd, q_pe_THd = q_TX.view(T, H, dn + dr).split((dn, dr), dim=-1)
    latent_TR, k_pe_Tr = F.linear(x_TD, mw.wkv_a, mw.bkv_a).split((R, dr), dim=-1)
    latent_TR = rms_norm(latent_TR, mw.kv_a_norm, MLA_NORM_EPS)
    interleave = config.rope.interleave
    q_pe_THd = apply_rope(q_pe_THd, cos_Thd, sin_Thd, interleave)
    k_pe_T1r = apply_rope(k_pe_Tr[:, None], cos_Thd, sin_Thd, interleave)
    kv.write(layer, meta.block_T, meta.offset_T, latent_TR[:, None], k_pe_T1r)
    w_kvb_HXR = mw.wkv_b.view(H, dn + dv, R)
    q_lat_THR = torch.einsum("thd,hdr->thr", q_nope_THd, w_kvb_HXR[:, :dn])      # absorb W_uk into q
    q_THX = torch.cat((q_lat_THR, q_pe_THd), dim=-1)
    o_THR = attend_split(q_THX, meta, lambda q, sub: _attend_mla(q, sub, kv, layer, m.softmax_scale))
    return lw.o(torch.einsum("thr,hvr->thv", o_THR, w_kvb_HXR[:, dn:]).flatten(1))   # W_uv after attention


def _attend_mla(q_THX: torch.Tensor, meta: AttentionMetadata, kv: KVCache, layer: int, scale: float
                ) -> torch.Tensor:
    """Absorbed queries [latent, pe] of one group's tokens over the cached (latent, k_pe) -> o_THR (latent space)."""
    if meta.decode_only:                     # T = B: one query row per sequence
        latent_B1CR, k_pe_B1Cr, bias_B1C, shared = meta.read_decode_kv(kv, layer)
        if shared is not None:               # the shared blocks' (latent, k_pe) [1, P, *]
            shared = (torch.cat(shared, dim=-1), shared[0])
        return decode_attention(q_THX, torch.cat((latent_B1CR, k_pe_B1Cr), dim=-1), latent_B1CR, bias_B1C, scale,
                                prefix=shared)
    latent_B1CR, k_pe_B1Cr = kv.read(layer, meta.table_Bn, meta.ctx_len)
    k_B1CX = torch.cat((latent_B1CR, k_pe_B1Cr), dim=-1)
    q_BHQX = q_THX[meta.pad_index_BQ].transpose(1, 2)
    o_BHQR = F.scaled_dot_product_attention(q_BHQX, k_B1CX, latent_B1CR, attn_mask=meta.mask_B1QC,
                                            scale=scale, enable_gqa=True)
    return o_BHQR.transpose(1, 2).flatten(0, 1)[meta.unpad_index_T]
