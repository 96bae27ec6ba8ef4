"""Our pure-torch MoE model vs transformers 5.x on checkpoints transformers itself wrote."""
from __future__ import annotations

import pytest
import torch

from serving.model.kv_cache import KVCache
from serving.model.model import BatchLayout
from serving.model.moe import experts_forward
from serving.model.weights import CheckpointReader, load_all_experts
from tests.hf_reference import (batched_decode_vs_hf, build_hf_checkpoint, hf_greedy, hf_logits, load_ours, our_greedy,
                                our_prefill_logits)

ATOL = 1e-4
CASES = {
    "mixtral-e4k2-hd16": dict(family="mixtral"),
    "mixtral-e3k1-tied-window6-legacy": dict(family="mixtral", num_local_experts=3, num_experts_per_tok=1,
                                             tie_word_embeddings=True, sliding_window=6, head_dim=12,
                                             legacy_config=True),
    "mixtral-e16k4-mha": dict(family="mixtral", num_local_experts=16, num_experts_per_tok=4, num_key_value_heads=4),
    "qwen2-e5k3-norm-dense0": dict(family="qwen2_moe", num_experts=5, num_experts_per_tok=3, norm_topk_prob=True,
                                   mlp_only_layers=[0]),
    "qwen2-e8k4-nonorm-step2": dict(family="qwen2_moe", num_experts=8, num_experts_per_tok=4, norm_topk_prob=False,
                                    decoder_sparse_step=2, num_hidden_layers=3, head_dim=24),
    "qwen2-e3k2-nonorm-legacy": dict(family="qwen2_moe", num_experts=3, num_experts_per_tok=2, head_dim=12,
                                     legacy_config=True),
}
PROMPT = [1, 17, 5, 88, 42, 42, 9, 63, 30, 71, 2, 14]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    path, hf = build_hf_checkpoint(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    model, dispatch = load_ours(path)
    return path, hf, model, dispatch


def test_prefill_logits_match_hf(case):
    _, hf, model, dispatch = case
    ours, ref = our_prefill_logits(model, dispatch, PROMPT), hf_logits(hf, PROMPT)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert ref.std() > 0.1   # the reference is not degenerate, so 1e-4 is a real bound
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_incremental_decode_matches_hf(case):
    _, hf, model, dispatch = case
    ref = hf_logits(hf, PROMPT)
    kv = KVCache(model.config, 2, 32)
    rows = [model.forward(torch.tensor(PROMPT[:5]), BatchLayout((1,), (0,), (5,)), kv, dispatch)]
    for pos in range(5, len(PROMPT)):
        rows.append(model.forward(torch.tensor(PROMPT[pos:pos + 1]), BatchLayout((1,), (pos,), (1,)), kv, dispatch))
    torch.testing.assert_close(torch.cat(rows), ref[4:], atol=ATOL, rtol=0)


def _run_alone(model, dispatch, ids, chunks):
    """Feed `ids` in `chunks` through a fresh cache; return all-token logits of the last chunk."""
    kv, pos = KVCache(model.config, 1, 32), 0
    for n in chunks:
        out = model.forward(torch.tensor(ids[pos:pos + n]), BatchLayout((0,), (pos,), (n,)), kv, dispatch,
                            all_logits=True)
        pos += n
    return out


def test_batched_mixed_step_equals_solo(case):
    """One step mixing decode, fresh prefill, chunked prefill and a reused slot == each sequence alone."""
    _, hf, model, dispatch = case
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    a, b, c, d, junk = (torch.randint(0, V, (n,), generator=g).tolist() for n in (9, 6, 12, 3, 10))
    kv = KVCache(model.config, 4, 32)
    # step 1: a prefills 8 in slot 2, c prefills 5 in slot 0, junk fills slot 3
    model.forward(torch.tensor(a[:8] + c[:5] + junk), BatchLayout((2, 0, 3), (0, 0, 0), (8, 5, 10)), kv, dispatch)
    # step 2: a decodes 1, b prefills 6 (slot 1), c prefills its next 7, d prefills 3 into junk's old slot 3
    ids = a[8:9] + b + c[5:12] + d
    layout = BatchLayout(slots=(2, 1, 0, 3), start_pos=(8, 0, 5, 0), q_lens=(1, 6, 7, 3))
    both = model.forward(torch.tensor(ids), layout, kv, dispatch, all_logits=True)
    solo = torch.cat([_run_alone(model, dispatch, a, (8, 1)), _run_alone(model, dispatch, b, (6,)),
                      _run_alone(model, dispatch, c, (5, 7)), _run_alone(model, dispatch, d, (3,))])
    torch.testing.assert_close(both, solo, atol=ATOL, rtol=0)
    ref = torch.cat([hf_logits(hf, a)[8:], hf_logits(hf, b), hf_logits(hf, c)[5:], hf_logits(hf, d)])
    torch.testing.assert_close(both, ref, atol=ATOL, rtol=0)
    # last-token logits per sequence ([B, V]) are the rows at the end of each run
    kv2 = KVCache(model.config, 4, 32)
    model.forward(torch.tensor(a[:8] + c[:5] + junk), BatchLayout((2, 0, 3), (0, 0, 0), (8, 5, 10)), kv2, dispatch)
    last = model.forward(torch.tensor(ids), layout, kv2, dispatch)
    torch.testing.assert_close(last, both[[0, 6, 13, 16]], atol=ATOL, rtol=0)


def test_batched_decode_step_matches_hf(case):
    """A decode-only step (one new token per sequence: the batched-GEMM attention path) over sequences
    of different lengths in scattered slots == transformers on each sequence."""
    _, hf, model, dispatch = case
    ours, ref = batched_decode_vs_hf(model, dispatch, hf)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_greedy_generation_matches_hf_generate(case):
    _, hf, model, dispatch = case
    assert our_greedy(model, dispatch, PROMPT, 32) == hf_greedy(hf, PROMPT, 32)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_expert_parallel_split_sums_to_whole(case, num_shards):
    """S shards with disjoint expert subsets, partial outputs summed == all experts in one place."""
    path, _, model, dispatch = case
    experts = load_all_experts(CheckpointReader(path), model.config)
    shards = [{l: {e: w for e, w in by_e.items() if e % num_shards == s} for l, by_e in experts.items()}
              for s in range(num_shards)]

    def split_dispatch(layer, x_TD, ids_TK, w_TK):
        return sum(experts_forward(x_TD, ids_TK, w_TK, shard[layer]) for shard in shards)

    whole = our_prefill_logits(model, dispatch, PROMPT)
    torch.testing.assert_close(our_prefill_logits(model, split_dispatch, PROMPT), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bf16_close_to_fp32(tmp_path, family):
    path, _ = build_hf_checkpoint(tmp_path, family)
    fp32, bf16 = load_ours(path), load_ours(path, torch.bfloat16)
    ref = our_prefill_logits(*fp32, PROMPT)
    out = our_prefill_logits(*bf16, PROMPT)
    assert bf16[0].weights.embed.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_mixed_step_metadata_splits_decode_from_prefill():
    """A step mixing decodes and prefill chunks attends in two groups (decodes on the decode path,
    chunks on padded SDPA), each with the token indices it owns; a pure step is one group."""
    from serving.model.layers import AttentionMetadata
    tables = tuple(tuple(range(4 * s, 4 * s + 4)) for s in range(4))
    meta = AttentionMetadata.build(tables, start_pos=(8, 0, 5, 2), q_lens=(1, 6, 1, 3), sliding_window=None,
                                   block_size=4)
    (dec_idx, dec), (pre_idx, pre) = meta.parts
    assert dec_idx.tolist() == [0, 7] and pre_idx.tolist() == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert dec.decode_only and dec.table_Bn[:, 0].tolist() == [0, 8] and dec.ctx_len == 12   # 9, in whole blocks
    assert not pre.decode_only and pre.table_Bn[:, 0].tolist() == [4, 12] and pre.ctx_len == 8    # 6, in whole blocks
    assert pre.pos_T.tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4]
    windowed = meta.with_window(2)
    # the decodes read only the blocks their 2-token windows cover: positions 7-8 of sequence 0 in
    # its blocks 1 and 2 (ids 1, 2: positions 4-11), position 4-5 of sequence 2 in its block 1 (id 9)
    wdec = windowed.parts[0][1]
    assert wdec.table_Bn.tolist() == [[1, 2], [9, 0]] and wdec.ctx_len == 8
    assert wdec.decode_bias_B1C[0, 0].isfinite().tolist() == [False] * 3 + [True] * 2 + [False] * 3
    assert wdec.decode_bias_B1C[1, 0].isfinite().tolist() == [True] * 2 + [False] * 6
    assert windowed.parts[1][1].ctx_len == pre.ctx_len                 # chunks keep their whole context
    for q_lens in ((1, 1, 1, 1), (2, 6, 3, 3)):
        assert AttentionMetadata.build(tables, (3, 0, 5, 2), q_lens, None, 4).parts == ()


@pytest.mark.parametrize("native", [True, False])
def test_decode_attention_in_bf16_runs_upcast_where_the_cpu_lacks_bf16_gemms(monkeypatch, native):
    """Where the CPU runs bf16 GEMMs natively a bf16 cache's attention GEMMs run in bf16; where it
    does not (AVX2), q, K, V and the shared prefix are upcast: exactly the fp32 attention, rounded."""
    from serving.model import layers
    monkeypatch.setattr(layers, "native_cpu_gemm", lambda dtype: native or dtype == torch.float32)
    g = torch.Generator().manual_seed(4)
    B, H, G, C, P, d = 3, 4, 2, 8, 5, 16
    q, k, v = (torch.randn(*shape, generator=g).bfloat16() for shape in [(B, H, d), (B, G, C, d), (B, G, C, d)])
    prefix = (torch.randn(G, P, d, generator=g).bfloat16(), torch.randn(G, P, d, generator=g).bfloat16())
    bias = torch.zeros(B, 1, C)
    for pre in (None, prefix):
        out = layers.decode_attention(q, k, v, bias, d ** -0.5, prefix=pre)
        up = None if pre is None else (pre[0].float(), pre[1].float())
        ref = layers.decode_attention(q.float(), k.float(), v.float(), bias, d ** -0.5, prefix=up).bfloat16()
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, ref) != native          # native: bf16 GEMMs, rounded differently
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_decode_attention_matches_sdpa(dtype, tol):
    """decode_attention (one query row per sequence, GQA, keys padded to whole blocks and masked) equals
    SDPA in fp32 over each sequence's own keys; a bf16 cache runs its GEMMs in bf16, within bf16 rounding."""
    import torch.nn.functional as F
    from serving.model.layers import decode_attention
    torch.manual_seed(0)
    B, H, G, C, d = 5, 8, 2, 32, 16
    lens = [32, 1, 17, 30, 9]
    q_BHd = torch.randn(B, H, d).to(dtype)
    k_BGCd, v_BGCd = torch.randn(G, B, C, d).to(dtype).transpose(0, 1), torch.randn(G, B, C, d).to(dtype).transpose(0, 1)
    bias_B1C = torch.zeros(B, 1, C).masked_fill_(torch.arange(C)[None, None] >= torch.tensor(lens)[:, None, None],
                                                 float("-inf"))
    out = decode_attention(q_BHd, k_BGCd, v_BGCd, bias_B1C, d ** -0.5)
    assert out.dtype == dtype and out.shape == (B, H, d)
    for b, n in enumerate(lens):
        ref_H1d = F.scaled_dot_product_attention(q_BHd[b, :, None].float(), k_BGCd[b, :, :n].float(),
                                                 v_BGCd[b, :, :n].float(), enable_gqa=True)
        torch.testing.assert_close(out[b].float(), ref_H1d[:, 0], atol=tol, rtol=tol)
