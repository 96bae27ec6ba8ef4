"""Prefix caching: a sequence reuses the K/V blocks its tokens share with earlier ones, and no
one's tokens change (serving/engine/block_manager.py, scheduler.py, engine.py)."""
import pytest
import torch

from serving.engine.block_manager import BlockManager
from serving.engine.request import GenerationRequest
from serving.engine.scheduler import Scheduler, SchedulerConfig
from serving.model.sampling import SamplingParams

from test_engine import VOCAB, _engine, _hf_greedy, _req, _run, ckpt  # noqa: F401  (ckpt: the fixture)

BS = 4


def _filled(bm: BlockManager, seq: int, tokens: list[int], salt: str = "") -> list[int]:
    """`seq` holds `tokens` with all their K/V computed (registered): its table."""
    assert bm.start(seq, bm.cached_prefix(tokens, salt), len(tokens))
    bm.register(seq, tokens, len(tokens), salt)
    return bm.table(seq)


# ---- BlockManager ------------------------------------------------------------------------

def test_a_later_sequence_shares_the_whole_blocks_of_its_prefix_and_computes_the_rest():
    bm = BlockManager(16, BS, prefix_caching=True)
    a = _filled(bm, 0, list(range(10, 20)))                       # 10 tokens: 2 full blocks + 2 tokens
    prefix = bm.cached_prefix(list(range(10, 18)) + [99, 98, 97])  # shares 8 tokens = 2 blocks
    assert [e.block for e in prefix] == a[:2]
    assert bm.start(1, prefix, 11)
    assert bm.table(1)[:2] == a[:2] and bm.table(1)[2] not in a   # its third block is its own
    assert bm.num_used == 4                                       # 3 of a + 1 new
    # a prompt that is exactly cached blocks still computes its last token (its logits)
    assert len(bm.cached_prefix(list(range(10, 18)))) == 1
    assert bm.cached_prefix([10, 11, 12]) == []                   # no whole block


def test_keys_are_exact_salted_and_chained():
    bm = BlockManager(16, BS, prefix_caching=True)
    _filled(bm, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9], salt="tenant-a")
    assert len(bm.cached_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0], "tenant-a")) == 2
    assert bm.cached_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0], "tenant-b") == []      # another tenant: nothing
    assert len(bm.cached_prefix([1, 2, 3, 4, 5, 6, 7, 0, 0], "tenant-a")) == 1  # second block differs
    # the same second block after a different first one is another entry: chained on the first
    assert len(bm.cached_prefix([0, 2, 3, 4, 5, 6, 7, 8, 0], "tenant-a")) == 0


def test_released_blocks_stay_cached_until_the_free_list_runs_out_tail_first():
    bm = BlockManager(4, BS, prefix_caching=True)
    toks = list(range(100, 117))                          # 17 tokens: 4 full blocks + 1 token
    bm.start(0, [], 16)
    bm.register(0, toks, 16)
    table = bm.table(0)
    bm.free(0)
    assert bm.num_free == 4 and bm.num_used == 0 and bm.num_cached == 4
    assert [e.block for e in bm.cached_prefix(toks)] == table   # all four reusable
    # a newcomer needing 1 block evicts the least recently released: the old sequence's last block
    assert bm.start(1, [], 2)
    assert bm.table(1) == [table[3]]
    assert [e.block for e in bm.cached_prefix(toks)] == table[:3]
    # taking cached blocks back out of the evictable pool counts against the room
    assert not bm.start(2, bm.cached_prefix(toks), 13)    # 3 shared + 1 new: the 3 were all the room
    assert bm.num_free == 3
    assert bm.start(2, bm.cached_prefix(toks), 12)        # 3 shared, nothing new
    assert bm.num_free == 0
    bm.free(1), bm.free(2)
    assert bm.num_used == 0


def test_shared_blocks_are_released_only_by_their_last_holder():
    bm = BlockManager(8, BS, prefix_caching=True)
    toks = list(range(1, 10))
    _filled(bm, 0, toks)
    assert bm.start(1, bm.cached_prefix(toks), 9)         # shares blocks 0-1
    bm.free(0)
    assert bm.num_used == 3                               # 2 shared + seq 1's own block
    assert len(bm.cached_prefix(toks)) == 2
    bm.free(1)
    assert bm.num_used == 0 and len(bm.cached_prefix(toks)) == 2


def test_a_block_computed_twice_at_once_is_registered_once_and_both_share_it():
    bm = BlockManager(8, BS, prefix_caching=True)
    toks = [5, 6, 7, 8, 9]
    for seq in (0, 1):                                    # both started before either registered
        assert bm.start(seq, bm.cached_prefix(toks), 5)
    assert bm.num_used == 4
    bm.register(0, toks, 5)
    copy = bm.table(1)[0]
    bm.register(1, toks, 5)                               # the same content: seq 1 switches to seq 0's block
    assert bm.num_cached == 1 and bm.table(1)[0] == bm.table(0)[0] != copy
    assert bm.num_used == 3                               # its copy went back to the free list
    assert [e.block for e in bm.cached_prefix(toks)] == [bm.table(0)[0]]
    bm.free(1)
    assert bm.num_used == 2                               # the shared block stays with seq 0
    bm.free(0)
    assert bm.num_free == 8 and bm.num_cached == 1


def test_without_prefix_caching_nothing_is_looked_up_or_kept():
    bm = BlockManager(8, BS)
    _filled(bm, 0, list(range(9)))
    assert bm.cached_prefix(list(range(9))) == [] and bm.num_cached == 0
    bm.free(0)
    assert bm.num_free == 8


# ---- Scheduler ----------------------------------------------------------------------------

def _sreq(rid: str, ids: list[int], salt: str = "") -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(ids), cache_salt=salt,
                             sampling=SamplingParams(max_tokens=4, temperature=0.0))


def test_the_scheduler_starts_a_sequence_past_its_cached_prefix():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                                  block_size=BS, prefix_caching=True))
    system = list(range(3, 23))                            # a 20-token "system prompt": 5 blocks
    s.add(_sreq("a", system + [40, 41]))
    out = s.schedule()
    assert out.q_lens == (22,)
    s.computed(out.seqs[0], 22)
    out.seqs[0].token_ids.append(7)                        # its first sampled token: it decodes next
    s.add(_sreq("b", system + [50]))
    s.add(_sreq("c", system + [60], salt="other-tenant"))
    out = s.schedule()
    assert [q.request_id for q in out.seqs] == ["a", "b", "c"]
    assert out.q_lens == (1, 1, 21)                        # b prefills only its own last token;
    assert out.seqs[1].num_cached == 20                    # c (another salt) computes everything
    tables = out.block_tables
    assert tables[1][:5] == tables[0][:5] and not set(tables[2]) & set(tables[0])
    assert (s.prefix_query_tokens, s.prefix_hit_tokens) == (22 + 21 + 21, 20)


# ---- Engine (real model, checked against transformers) --------------------------------------

def test_requests_sharing_a_prompt_prefix_get_transformers_tokens_and_skip_its_prefill(ckpt):
    path, hf = ckpt
    g = torch.Generator().manual_seed(11)
    system = torch.randint(3, VOCAB, (37,), generator=g).tolist()
    turns = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 1)]
    engine = _engine(path, block_size=8, prefix_caching=True)
    first = _run(engine, [_req("first", system + turns[0], max_tokens=12)])["first"]
    assert [e.token_id for e in first] == _hf_greedy(hf, system + turns[0], 12)
    # the second turn: the first prompt, its answer, and more; and two others sharing the system prompt
    answer = [e.token_id for e in first]
    prompts = {"turn2": system + turns[0] + answer + turns[1], "other": system + turns[2],
               "same": system + turns[0]}
    hits_before = engine.stats.prefix_hit_tokens_total
    events = _run(engine, [_req(k, p, max_tokens=12) for k, p in prompts.items()])
    for k, p in prompts.items():
        assert [e.token_id for e in events[k]] == _hf_greedy(hf, p, 12), k
    # turn2 reuses whole blocks of the first request's prompt and answer: (37 + 3 + 12 - 1) // 8 = 6 blocks;
    # "other" and "same" the system prompt's 4 whole blocks (37 // 8), "same" one more (40 - 1) // 8 = 4
    assert engine.stats.prefix_hit_tokens_total - hits_before == (6 + 4 + 4) * 8
    assert engine.stats.kv_blocks_used == 0
    # each request's events say how much of its prompt came from the cache (the API's usage)
    assert {e.cached_tokens for e in first} == {0}
    assert {k: {e.cached_tokens for e in evs} for k, evs in events.items()} == \
        {"turn2": {6 * 8}, "other": {4 * 8}, "same": {4 * 8}}


def test_prefix_caching_with_chunked_prefill_preemption_and_eviction_keeps_every_token(ckpt):
    """The test_engine preemption workload with shared prefixes and a cache too small to keep
    them: blocks are shared, evicted and recomputed, and every request still streams transformers'
    greedy tokens, each once."""
    path, hf = ckpt
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, VOCAB, (19,), generator=g).tolist()
    prompts = [shared[:n] + torch.randint(3, VOCAB, (k,), generator=g).tolist()
               for n, k in ((19, 4), (8, 3), (19, 12), (16, 1), (0, 7), (19, 2))]
    engine = _engine(path, shards=2, max_num_seqs=5, max_model_len=64, max_num_batched_tokens=10,
                     block_size=8, num_kv_blocks=10, prefix_caching=True)
    events = _run(engine, [_req(str(i), p, max_tokens=20) for i, p in enumerate(prompts)], max_steps=3000)
    for i, p in enumerate(prompts):
        assert [e.token_id for e in events[str(i)]] == _hf_greedy(hf, p, 20), f"prompt {i}"
        assert [e.completion_tokens for e in events[str(i)]] == list(range(1, 21))
    assert engine.stats.preempted_total > 0
    assert engine.stats.prefix_hit_tokens_total > 0
    assert engine.stats.kv_blocks_used == 0


@pytest.mark.parametrize("salts", [("a", "a"), ("a", "b")])
def test_the_cache_salt_decides_who_shares(ckpt, salts):
    path, _ = ckpt
    engine = _engine(path, block_size=8, prefix_caching=True)
    prompt = list(range(3, 30))
    for i, salt in enumerate(salts):
        req = _req(str(i), prompt, max_tokens=2)
        _run(engine, [GenerationRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                                        sampling=req.sampling, cache_salt=salt)])
    assert engine.stats.prefix_hit_tokens_total == (24 if salts[0] == salts[1] else 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_shared_block_attention_equals_attention_over_the_whole_context(dtype, tol):
    """decode_attention with `prefix` (P positions every sequence shares, read once) = plain decode
    attention over [prefix, own context] per sequence, padding masked."""
    from serving.model.layers import decode_attention
    g = torch.Generator().manual_seed(0)
    B, H, G, P, C, d = 5, 8, 2, 24, 16, 32
    q = torch.randn(B, H, d, generator=g).to(dtype)
    k_p, v_p = (torch.randn(G, P, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, G, C, d, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([1, 16, 7, 3, 12])                       # own positions of each sequence
    bias = torch.zeros(B, 1, C).masked_fill_(torch.arange(C)[None, None] >= lens[:, None, None], float("-inf"))
    ours = decode_attention(q, k, v, bias, d ** -0.5, prefix=(k_p, v_p))
    k_all = torch.cat((k_p[None].expand(B, G, P, d), k), dim=2)
    v_all = torch.cat((v_p[None].expand(B, G, P, d), v), dim=2)
    ref = decode_attention(q, k_all, v_all, torch.cat((torch.zeros(B, 1, P), bias), dim=-1), d ** -0.5)
    assert ours.dtype == dtype and ours.shape == (B, H, d)
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)


def test_only_blocks_before_every_sequence_s_last_token_count_as_shared(monkeypatch):
    from serving.model import layers
    from serving.model.layers import shared_prefix_blocks
    monkeypatch.setattr(layers, "MIN_SHARED_BLOCKS", 2)
    tables = ((7, 8, 9, 1), (7, 8, 9, 2), (7, 8, 9, 3))
    assert shared_prefix_blocks(tables, (12, 13, 15), (1, 1, 1), 4) == 3
    assert shared_prefix_blocks(tables, (11, 13, 15), (1, 1, 1), 4) == 2      # one sequence's last token in block 2
    assert shared_prefix_blocks(((7, 8, 9), (7, 5, 9)), (10, 10), (1, 1), 4) == 0   # 1 < MIN_SHARED_BLOCKS
    assert shared_prefix_blocks(((7, 8, 9),), (10,), (1,), 4) == 0            # one sequence: nothing to share


def test_a_request_waits_a_step_rather_than_compute_a_block_another_computes_in_it():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                                  block_size=BS, prefix_caching=True))
    system = list(range(3, 15))                            # 12 tokens: 3 blocks
    s.add(_sreq("a", system + [40]))
    s.add(_sreq("b", system + [50, 51]))
    s.add(_sreq("c", [99] * 9))                            # behind b: FIFO holds it too
    out = s.schedule()
    assert [q.request_id for q in out.seqs] == ["a"]       # b would compute a's blocks again: it waits
    s.computed(out.seqs[0], 13)
    out.seqs[0].token_ids.append(7)
    out = s.schedule()
    assert [q.request_id for q in out.seqs] == ["a", "b", "c"]
    assert out.q_lens == (1, 2, 9) and out.seqs[1].num_cached == 12
    # another salt, or a block nobody computes in this step: no wait
    s2 = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                                   block_size=BS, prefix_caching=True))
    s2.add(_sreq("a", system + [40]))
    s2.add(_sreq("b", system + [50], salt="other"))
    assert [q.request_id for q in s2.schedule().seqs] == ["a", "b"]


def test_prefill_chunks_of_very_different_lengths_attend_in_groups():
    from serving.model.layers import attention_groups
    assert attention_groups((1, 1, 1)) is None                       # all decode
    assert attention_groups((64, 64, 40)) is None                    # padding 192 rows for 168: one SDPA
    assert attention_groups((1, 1, 64)) == [[0, 1], [2]]             # decodes apart from the chunk
    assert attention_groups((256, 64, 64, 64, 1)) == [[4], [1, 2, 3], [0]]   # 4x256 rows for 448: by length
    assert attention_groups((3, 4, 200)) == [[0, 1], [2]]                # (2, 4] and (128, 256]


def test_decodes_sharing_different_prefixes_attend_in_a_group_per_prefix():
    from serving.model.layers import attention_groups
    a, b = (1, 2), (3, 4)
    keys = [a, b, a, None, a, b, a, b, b, (5, 6)]
    q = (1,) * 10
    assert attention_groups(q, keys) == [[0, 2, 4, 6], [1, 5, 7, 8], [3, 9]]
    assert attention_groups(q[:4] + (30,), keys[:4] + [None]) == [[0, 1, 2, 3], [4]]   # 2 on a prefix: too few
    assert attention_groups((1, 1, 1, 1, 1), [a] * 5) is None                       # one group: the whole step
    assert attention_groups((1, 1, 1, 1, 64), [a] * 4 + [None]) == [[0, 1, 2, 3], [4]]


def test_tenants_with_their_own_system_prompt_decode_together_with_transformers_tokens(ckpt, monkeypatch):
    """Two cached system prompts (two tenants' salts), four requests on each and two others, all
    decoding in the same steps: each prompt's group reads its blocks once, the others attend as
    before, and every request gets transformers' greedy tokens."""
    from serving.model import layers
    path, hf = ckpt
    shared_calls, plain = [], layers.decode_attention

    def counting(*args, prefix=None, **kw):
        shared_calls.append(None if prefix is None else args[0].shape[0])
        return plain(*args, prefix=prefix, **kw)
    monkeypatch.setattr(layers, "decode_attention", counting)
    g = torch.Generator().manual_seed(21)
    systems = {salt: torch.randint(3, VOCAB, (40,), generator=g).tolist() for salt in ("a", "b")}
    engine = _engine(path, block_size=4, prefix_caching=True, max_num_seqs=12)   # 10 blocks >= MIN_SHARED_BLOCKS

    def req(rid, ids, salt):
        r = _req(rid, ids, max_tokens=10)
        return GenerationRequest(request_id=rid, prompt_token_ids=r.prompt_token_ids, sampling=r.sampling,
                                 cache_salt=salt)
    _run(engine, [req(f"warm-{s}", p + [5], s) for s, p in systems.items()])
    prompts = {f"{s}{i}": (systems[s] + torch.randint(3, VOCAB, (1 + i,), generator=g).tolist(), s)
               for s in systems for i in range(4)}
    prompts.update({f"x{i}": (torch.randint(3, VOCAB, (20,), generator=g).tolist(), "a") for i in range(2)})
    shared_calls.clear()
    events = _run(engine, [req(rid, p, s) for rid, (p, s) in prompts.items()])
    for rid, (p, _) in prompts.items():
        assert [e.token_id for e in events[rid]] == _hf_greedy(hf, p, 10), rid
    assert 4 in shared_calls                                   # a group of 4 read its prefix once
    assert None in shared_calls                                # the 2 others, the plain way
