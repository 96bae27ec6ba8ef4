"""Admission control unit tests (pure: no engine, no Ray)."""
import pytest

from serving.api.errors import Overloaded
from serving.engine.admission import AdmissionConfig, AdmissionController
from serving.engine.request import GenerationRequest, Priority
from serving.model.sampling import SamplingParams


def _req(rid, prompt=10, max_tokens=10, priority=Priority.INTERACTIVE):
    return GenerationRequest(request_id=rid, prompt_token_ids=(1,) * prompt,
                             sampling=SamplingParams(max_tokens=max_tokens), priority=priority)


def test_bounded_queue_then_release_frees_room():
    ac = AdmissionController(AdmissionConfig(max_running=2, max_queued=2, token_budget=10_000))
    for i in range(4):
        ac.admit(_req(str(i)))
    with pytest.raises(Overloaded) as err:
        ac.admit(_req("x"))
    assert err.value.retry_after_s > 0 and "queue" in err.value.message
    ac.release("0")
    ac.admit(_req("x"))
    assert ac.stats.in_flight == 4 and ac.stats.rejected_total == 1


def test_token_budget_reserves_prompt_plus_max_tokens():
    ac = AdmissionController(AdmissionConfig(max_running=8, max_queued=8, token_budget=100))
    ac.admit(_req("a", prompt=30, max_tokens=40))          # 70 reserved
    with pytest.raises(Overloaded, match="token budget"):
        ac.admit(_req("b", prompt=20, max_tokens=20))      # 110 > 100
    ac.admit(_req("c", prompt=10, max_tokens=20))          # 100 == budget: fits
    ac.release("a")
    assert ac.stats.reserved_tokens == 30


def test_batch_is_shed_first_while_interactive_is_admitted():
    ac = AdmissionController(AdmissionConfig(max_running=2, max_queued=4, token_budget=10_000, batch_share=0.5))
    ac.admit(_req("b0", priority=Priority.BATCH))
    ac.admit(_req("b1", priority=Priority.BATCH))
    ac.admit(_req("b2", priority=Priority.BATCH))
    ac.admit(_req("b3", priority=Priority.BATCH))            # 2 running + 2 of 4 queued: batch's share
    with pytest.raises(Overloaded):
        ac.admit(_req("b4", priority=Priority.BATCH))
    ac.admit(_req("i0"))                                     # interactive still gets in
    ac.admit(_req("i1"))
    with pytest.raises(Overloaded):
        ac.admit(_req("i2"))


def test_retry_after_grows_with_backlog_and_is_bounded():
    now = [0.0]
    cfg = AdmissionConfig(max_running=1, max_queued=50, token_budget=10**6, max_retry_after_s=5.0)
    ac = AdmissionController(cfg, clock=lambda: now[0])
    for i in range(10):                 # drain rate ~ 2 requests/s
        ac.admit(_req(f"w{i}"))
    for i in range(10):
        now[0] += 0.5
        ac.release(f"w{i}")
    short = ac._retry_after(in_flight=2)
    long = ac._retry_after(in_flight=40)
    assert 0.2 <= short < long <= 5.0


def test_release_of_unknown_request_is_harmless():
    ac = AdmissionController(AdmissionConfig())
    ac.release("never-admitted")
    assert ac.stats.in_flight == 0


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="batch_share"):
        AdmissionConfig(batch_share=0)


def test_interactive_is_shed_when_its_predicted_wait_exceeds_max_wait():
    now = [0.0]
    cfg = AdmissionConfig(max_running=2, max_queued=100, token_budget=10**6, max_wait_s=3.0)
    ac = AdmissionController(cfg, clock=lambda: now[0])
    ac.admit(_req("a"))
    now[0] = 2.0
    ac.release("a")                                  # service time 2 s: one batch of 2 per 2 s
    for i in range(4):                                # 2 running + 2 waiting
        ac.admit(_req(f"i{i}"))
    ac.admit(_req("i4"))                              # 3 ahead of a slot: 3 / 2 * 2 s = 3.0 s <= 3 s
    with pytest.raises(Overloaded, match="predicted wait"):
        ac.admit(_req("i5"))                          # 4 ahead: 4.0 s > 3 s
    ac.admit(_req("b0", priority=Priority.BATCH))      # batch is governed by its share, not the wait


def test_a_new_replica_uses_the_prior_service_time_until_one_request_finished():
    now = [0.0]
    cfg = AdmissionConfig(max_running=2, max_queued=100, token_budget=10**6, max_wait_s=2.0,
                          prior_service_s=2.0)
    ac = AdmissionController(cfg, clock=lambda: now[0])
    for i in range(4):                                # 2 running + 2 waiting: 2 ahead -> 2 / 2 * 2 s
        ac.admit(_req(f"i{i}"))
    with pytest.raises(Overloaded, match="predicted wait"):
        ac.admit(_req("i4"))                          # without the prior a burst would all get in
    now[0] = 0.5
    ac.release("i0")                                  # measured: 0.5 s replaces the prior
    for i in range(5, 9):
        ac.admit(_req(f"i{i}"))                       # 6 ahead at most: 6 / 2 * 0.5 s = 1.5 s


def test_service_time_counts_from_the_slot_not_from_admission():
    """A request that queued 3 s and then held its slot 1 s teaches a 1 s service time: the queue
    ahead is counted separately, so counting its wait again would shed interactive work the
    replica would serve in time."""
    now = [0.0]
    cfg = AdmissionConfig(max_running=2, max_queued=100, token_budget=10**6, max_wait_s=2.0)
    ac = AdmissionController(cfg, clock=lambda: now[0])
    ac.admit(_req("a"))
    now[0] = 3.0
    ac.started("a")                                   # got its slot (first token) after 3 s in the queue
    ac.started("never-admitted")                      # harmless
    now[0] = 4.0
    ac.release("a")                                   # held the slot 1 s
    for i in range(5):                                # 2 running + 3 waiting: 4 ahead of the next
        ac.admit(_req(f"i{i}"))
    ac.admit(_req("i5"))                              # 4 / 2 * 1 s = 2.0 s <= 2 s (with admit time: 8 s)
    with pytest.raises(Overloaded, match="predicted wait"):
        ac.admit(_req("i6"))                          # 5 / 2 * 1 s = 2.5 s > 2 s
    ac.release("i0")                                  # released before it started: admit -> release
    assert ac._service_s == pytest.approx(0.8 * 1.0 + 0.2 * 0.0)


def test_interactive_is_shed_when_the_oldest_waiting_one_has_waited_past_max_wait():
    """The engine slowed down (a replica starting on the same cores): the measured service time
    still predicts a short wait, but the queue's head has waited longer than the objective."""
    now = [0.0]
    cfg = AdmissionConfig(max_running=2, max_queued=100, token_budget=10**6, max_wait_s=2.0)
    ac = AdmissionController(cfg, clock=lambda: now[0])
    ac.admit(_req("a"))
    now[0] = 0.5
    ac.release("a")                                   # service time 0.5 s
    for i in range(3):                                # 2 running + 1 waiting
        ac.admit(_req(f"i{i}"))
    ac.started("i0")
    ac.started("i1")
    now[0] = 1.5
    ac.admit(_req("i3"))                              # model: 2 / 2 * 0.5 s; the head (i2) has waited 1.0 s
    now[0] = 2.6
    with pytest.raises(Overloaded, match=r"predicted wait 2.1s"):
        ac.admit(_req("i4"))                          # model: 0.5 s, but the head has waited 2.1 s > 2 s
    ac.admit(_req("b0", priority=Priority.BATCH))      # batch is governed by its share, not the wait
    ac.started("i2")                                  # the head got its slot: i3 (1.1 s) is the head now
    ac.admit(_req("i5"))
    ac.release("i3")                                  # a waiting request that is cancelled leaves the queue
    now[0] = 10.0
    ac.started("i5")
    ac.admit(_req("i6"))                              # nothing waits: the model alone (3 ahead / 2 * 0.5 s)


def test_a_slowdown_in_step_time_raises_the_predicted_wait_before_slowed_requests_finish():
    """Requests finished in 0.5 s (20 tokens at 25 ms a step); then steps slow to 100 ms (the
    cores are shared with a replica starting). No slowed request has finished yet, so the measured
    service time still says 0.5 s; 20 tokens x 100 ms says 2 s, and that is what the wait uses."""
    now, step = [0.0], [0.025]
    cfg = AdmissionConfig(max_running=2, max_queued=100, token_budget=10**6, max_wait_s=1.5)
    ac = AdmissionController(cfg, clock=lambda: now[0], step_s=lambda: step[0])
    ac.admit(_req("a", max_tokens=20))
    ac.started("a")
    now[0] = 0.5
    ac.release("a", generated=20)                     # 0.5 s service, 20 tokens
    for i in range(3):                                 # 2 running + 1 waiting
        ac.admit(_req(f"i{i}", max_tokens=20))
    for i in range(2):
        ac.started(f"i{i}")
    ac.started("i2")                                  # (no waiting head: the model alone decides)
    ac.admit(_req("i3", max_tokens=20))               # 2 ahead / 2 x max(0.5, 20 x 0.025) = 0.5 s
    ac.started("i3")
    step[0] = 0.1
    with pytest.raises(Overloaded, match="predicted wait 3.0s"):
        ac.admit(_req("i4", max_tokens=20))           # 3 ahead / 2 x 20 x 0.1 s = 3.0 s > 1.5 s


def test_a_new_replica_predicts_service_from_the_step_time_and_max_tokens():
    """Nothing finished yet: the prior (0.5 s) says the next slot frees in 1 / 2 x 0.5 s; max_tokens
    x the step time says both running requests hold their slots 2 s, and they started together."""
    now = [0.0]
    cfg = AdmissionConfig(max_running=2, max_queued=100, token_budget=10**6, max_wait_s=1.5,
                          prior_service_s=0.5)
    ac = AdmissionController(cfg, clock=lambda: now[0], step_s=lambda: 0.1)
    for i in range(2):
        ac.admit(_req(f"i{i}", max_tokens=20))
        ac.started(f"i{i}")
    with pytest.raises(Overloaded, match="predicted wait 2.0s"):
        ac.admit(_req("i2", max_tokens=20))           # 20 x 0.1 s after the first running one started


def test_requests_that_started_together_free_their_slots_together():
    """A burst took both slots at t=0 (service 2 s, measured). At t=0.1 the uniform estimate says a
    slot frees every 1 s (1 ahead / 2 slots x 2 s), but both free at t=2: the wait is 1.9 s."""
    now = [0.0]
    cfg = AdmissionConfig(max_running=2, max_queued=100, token_budget=10**6, max_wait_s=1.5)
    ac = AdmissionController(cfg, clock=lambda: now[0])
    ac.admit(_req("a"))
    ac.started("a")
    now[0] = 2.0
    ac.release("a")                                   # service 2 s
    now[0] = 10.0
    for i in range(2):
        ac.admit(_req(f"i{i}"))
        ac.started(f"i{i}")
    now[0] = 10.1
    with pytest.raises(Overloaded, match="predicted wait 1.9s"):
        ac.admit(_req("i2"))
    now[0] = 10.6
    ac.admit(_req("i3"))                              # 1.4 s left on the oldest slot
