"""Scheduler unit tests: a real Scheduler, no model, no Ray."""
from serving.engine.request import FinishReason, GenerationRequest
from serving.engine.scheduler import Scheduler, SchedulerConfig, SeqStatus
from serving.model.sampling import SamplingParams


def _req(rid: str, n_prompt: int, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(range(3, 3 + n_prompt)),
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0))


def _advance(out):
    """Pretend the model ran: K/V of the scheduled tokens are cached, and every sequence whose
    tokens are all cached now (not mid-prompt) samples one token."""
    for seq, q in zip(out.seqs, out.q_lens):
        seq.num_cached += q
        if seq.num_uncached == 0:
            seq.token_ids.append(7)


def test_prefill_then_decode_and_new_requests_join_at_step_boundary():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100, max_model_len=64))
    a = s.add(_req("a", 5))
    out = s.schedule()
    assert [x.request_id for x in out.seqs] == ["a"] and out.q_lens == (5,) and out.num_prefill == 1
    _advance(out)
    b = s.add(_req("b", 3))
    out = s.schedule()                  # a decodes (1 token) while b prefills, in one step
    assert [x.request_id for x in out.seqs] == ["a", "b"] and out.q_lens == (1, 3)
    assert a.slot != b.slot and {a.status, b.status} == {SeqStatus.RUNNING}


def test_slots_bound_the_batch_and_finishing_frees_a_slot_at_once():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, max_model_len=64))
    seqs = [s.add(_req(str(i), 2)) for i in range(3)]
    out = s.schedule()
    assert len(out.seqs) == 2 and s.num_waiting == 1
    _advance(out)
    s.finish(seqs[0], FinishReason.LENGTH)
    assert seqs[0].slot == -1 and seqs[0].status is SeqStatus.FINISHED
    out = s.schedule()
    assert [x.request_id for x in out.seqs] == ["1", "2"] and s.num_waiting == 0
    assert seqs[2].slot >= 0


def test_chunked_prefill_mixes_with_decode_and_decodes_come_first():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64))
    big = s.add(_req("big", 20))        # bigger than the budget: prefilled in chunks of what is left
    out = s.schedule()
    assert out.q_lens == (8,) and out.num_prefill == 1
    _advance(out)
    assert big.num_cached == 8 and big.num_generated == 0          # mid-prompt: nothing sampled
    small = s.add(_req("small", 3))
    out = s.schedule()                  # big's next chunk takes the whole budget; small waits
    assert [x.request_id for x in out.seqs] == ["big"] and out.q_lens == (8,)
    _advance(out)
    out = s.schedule()                  # the last 4 prompt tokens of big, then small's 3 + 1 spare
    assert [x.request_id for x in out.seqs] == ["big", "small"] and out.q_lens == (4, 3)
    _advance(out)
    assert big.num_generated == 1 and small.num_generated == 1
    s.add(_req("late", 30))
    out = s.schedule()                  # both decode first (2 tokens), the new prompt gets the other 6
    assert [x.request_id for x in out.seqs] == ["big", "small", "late"] and out.q_lens == (1, 1, 6)
    assert out.num_prefill == 1


def test_kv_blocks_are_taken_as_sequences_grow_and_freed_when_they_finish():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=32,
                                  block_size=4, num_kv_blocks=10))
    a = s.add(_req("a", 5, max_tokens=20))
    out = s.schedule()
    assert out.block_tables == (tuple(s.blocks.table(a.slot)),) and len(out.block_tables[0]) == 2
    _advance(out)
    for _ in range(3):                  # 6, 7, 8 tokens cached: still 2 blocks
        _advance(s.schedule())
    assert a.num_cached == 8 and len(s.blocks.table(a.slot)) == 2
    _advance(s.schedule())              # the 9th token takes a third block
    assert len(s.blocks.table(a.slot)) == 3 and s.blocks.num_free == 7
    s.finish(a, FinishReason.LENGTH)
    assert s.blocks.num_free == 10


def test_a_full_kv_cache_preempts_the_newest_batch_sequence_which_is_recomputed_later():
    from serving.engine.request import Priority
    s = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64, max_model_len=16,
                                  block_size=4, num_kv_blocks=6))
    old = s.add(_req("old", 4, max_tokens=12))
    batch = s.add(GenerationRequest(request_id="batch", prompt_token_ids=(3, 4, 5, 6),
                                    sampling=SamplingParams(max_tokens=12), priority=Priority.BATCH))
    new = s.add(_req("new", 4, max_tokens=12))
    _advance(s.schedule())              # each holds 1 block (4 tokens), then samples its 5th
    assert s.blocks.num_free == 3
    _advance(s.schedule())              # each needs a 2nd block: 3 free, 3 taken
    assert s.blocks.num_free == 0 and s.num_preempted == 0
    for _ in range(3):
        _advance(s.schedule())          # up to 8 tokens cached: still 2 blocks each
    out = s.schedule()                  # the 9th token needs a 3rd block: the batch one makes room
    assert s.num_preempted == 1 and batch.status is SeqStatus.WAITING and batch.num_cached == 0
    assert [x.request_id for x in out.seqs] == ["old", "new"]
    assert [q.request_id for q in s.waiting] == ["batch"]
    assert batch.num_generated == 5     # what it generated stays; it is recomputed, not restarted
    s.finish(old, FinishReason.LENGTH)
    s.finish(new, FinishReason.LENGTH)
    out = s.schedule()                  # back in: the prompt and its 5 tokens are recomputed at once
    assert [x.request_id for x in out.seqs] == ["batch"] and out.q_lens == (9,)


def test_config_rejects_a_kv_cache_smaller_than_one_sequence():
    import pytest
    with pytest.raises(ValueError, match="num_kv_blocks"):
        SchedulerConfig(max_num_seqs=2, max_model_len=64, block_size=16, num_kv_blocks=3)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=16)


def test_cancel_of_waiting_and_running_sequences():
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=100, max_model_len=64))
    run, wait = s.add(_req("run", 2)), s.add(_req("wait", 2))
    _advance(s.schedule())
    s.finish(wait, FinishReason.CANCELLED)
    s.finish(run, FinishReason.CANCELLED)
    assert not s.has_work() and s.free_slots == [0]
    assert run.finish_reason is FinishReason.CANCELLED


def test_interactive_requests_join_before_waiting_batch_requests():
    from serving.engine.request import Priority
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=100, max_model_len=64))
    first = s.add(_req("running", 2))
    _advance(s.schedule())
    batch = GenerationRequest(request_id="batch", prompt_token_ids=(3, 4),
                              sampling=SamplingParams(max_tokens=4), priority=Priority.BATCH)
    s.add(batch)
    s.add(_req("interactive", 2))                     # arrives later, joins first
    assert [q.request_id for q in s.waiting] == ["interactive", "batch"]
    s.finish(first, FinishReason.LENGTH)
    out = s.schedule()
    assert [q.request_id for q in out.seqs] == ["interactive"]


def _batch_req(rid: str, n_prompt: int, max_tokens: int = 4) -> GenerationRequest:
    from serving.engine.request import Priority
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(range(3, 3 + n_prompt)),
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
                             priority=Priority.BATCH)


def test_an_interactive_request_takes_the_slot_of_the_newest_running_batch_sequence():
    s = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=100, max_model_len=64))
    inter = s.add(_req("i0", 2, max_tokens=8))
    old, new = s.add(_batch_req("b-old", 2, 8)), s.add(_batch_req("b-new", 2, 8))
    _advance(s.schedule())
    _advance(s.schedule())
    assert new.num_generated == 2 and not s.free_slots
    late = s.add(_req("i1", 3))
    out = s.schedule()                  # i1 joins now; the newest batch sequence gives way
    assert [x.request_id for x in out.seqs] == ["i0", "b-old", "i1"] and out.q_lens == (1, 1, 3)
    assert new.status is SeqStatus.WAITING and new.num_cached == 0 and s.num_preempted == 1
    assert new.num_generated == 2       # kept: recomputed later, nothing streamed twice
    assert late.slot >= 0 and inter.status is old.status is SeqStatus.RUNNING
    s.finish(inter, FinishReason.LENGTH)
    out = s.schedule()                  # a slot frees: the batch one is recomputed, prompt + 2 tokens
    assert [x.request_id for x in out.seqs][-1] == "b-new" and out.q_lens[-1] == 4


def test_priority_preemption_never_touches_interactive_work_and_can_be_turned_off():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, max_model_len=64))
    running = [s.add(_req(f"i{k}", 2)) for k in range(2)]
    _advance(s.schedule())
    s.add(_req("late", 2))
    out = s.schedule()                  # all slots interactive: the newcomer waits
    assert s.num_preempted == 0 and [x.request_id for x in out.seqs] == ["i0", "i1"]
    assert all(x.status is SeqStatus.RUNNING for x in running)

    off = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=100, max_model_len=64,
                                    priority_preemption=False))
    off.add(_batch_req("b", 2))
    _advance(off.schedule())
    off.add(_req("i", 2))
    out = off.schedule()
    assert off.num_preempted == 0 and [x.request_id for x in out.seqs] == ["b"]
