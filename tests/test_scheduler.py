"""Scheduler unit tests: a real Scheduler, no model, no Ray."""
from serving.engine.request import FinishReason, GenerationRequest
from serving.engine.scheduler import Scheduler, SchedulerConfig, SeqStatus
from serving.model.sampling import SamplingParams


def _req(rid: str, n_prompt: int, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(range(3, 3 + n_prompt)),
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0))


def _advance(out):
    """Pretend the model ran: K/V of the scheduled tokens are cached, one token sampled."""
    for seq, q in zip(out.seqs, out.q_lens):
        seq.num_cached += q
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


def test_token_budget_defers_prefill_but_never_starves_a_lone_prompt():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64))
    s.add(_req("big", 20))              # bigger than the budget but alone: still scheduled
    out = s.schedule()
    assert out.q_lens == (20,)
    _advance(out)
    s.add(_req("next", 10))             # 1 decode + 10 > 8: waits for a later step
    out = s.schedule()
    assert out.q_lens == (1,) and s.num_waiting == 1


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
