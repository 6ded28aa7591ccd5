"""Admission by estimated finish: a generation that would not get a KV slot and generate its reply
before its deadline, by the slots' recent turnover, is refused when it arrives or as soon as the
estimate says so in the queue; nothing is refused before there is an estimate, nor when a slot is
free, and sentiment requests never by it."""
import time

import pytest
from prometheus_client import CollectorRegistry

from qwen_worker.core.admission import SlotTurnover
from qwen_worker.core.queue import RequestQueue, Work
from qwen_worker.metrics import WorkerMetrics
from qwen_worker.protocol import GENERATE, SENTIMENT, Request, RequestFailed


def turnover(slots: int = 4, hold_s: float = 10.0, tokens: int = 100) -> SlotTurnover:
    seen = SlotTurnover(slots)
    for _ in range(SlotTurnover.MIN_SEEN):
        seen.observe(hold_s, tokens)
    return seen


def generation(request_id: int, deadline_in_s: float, kind: str = GENERATE, max_tokens: int = 100) -> Work:
    return Work(Request(request_id, kind, "chat", [1, 2, 3], time.monotonic() + deadline_in_s, max_tokens))


def test_no_estimate_before_a_few_generations_ended_then_weighted_means_of_their_holds():
    seen = SlotTurnover(slots=4)
    for _ in range(SlotTurnover.MIN_SEEN - 1):
        seen.observe(8.0, 80)
        assert seen.finish_s(3, 100) is None
    seen.observe(8.0, 80)
    assert seen.finish_s(3, 100) == pytest.approx((3 * 8.0 / 4, 8.0))  # three slots must free; a recent hold
    assert seen.finish_s(3, 10) == pytest.approx((6.0, 1.0))  # its own 10 tokens at 0.1 s each: shorter
    seen.observe(18.0, 80)
    assert seen.mean_hold_s == pytest.approx(8.0 + SlotTurnover.WEIGHT * 10.0)


def test_a_generation_that_would_not_finish_before_its_deadline_is_refused_on_arrival():
    metrics = WorkerMetrics(CollectorRegistry())
    queue = RequestQueue(64, metrics, turnover=turnover(slots=4, hold_s=8.0))  # a slot frees every 2 s
    for i in range(3):
        queue.put(generation(i, deadline_in_s=60))
    with pytest.raises(RequestFailed) as err:
        queue.put(generation(3, deadline_in_s=15))  # fourth in line: 8 s waiting, then 8 s generating
    assert err.value.code == "deadline_unreachable" and "about 8 s waiting" in err.value.message
    queue.put(generation(4, deadline_in_s=17))  # fourth in line too (3 refused): 16 s
    queue.put(generation(5, deadline_in_s=12, max_tokens=10))  # fifth: 10 s waiting, then 10 tokens (0.8 s)
    queue.put(generation(6, deadline_in_s=1, kind=SENTIMENT))  # scored in passes, not by slots
    assert len(queue) == 6
    assert metrics.registry.get_sample_value("qaio_rejections_total", {"reason": "deadline_unreachable"}) == 1


def test_free_slots_and_a_missing_estimate_admit():
    queue = RequestQueue(64, WorkerMetrics(CollectorRegistry()), free_slots=lambda: 2,
                         turnover=turnover(slots=4, hold_s=100.0))
    queue.put(generation(1, deadline_in_s=0.5))
    queue.put(generation(2, deadline_in_s=0.5))  # two slots are free: it may finish early, its deadline decides
    cold = RequestQueue(64, WorkerMetrics(CollectorRegistry()), turnover=SlotTurnover(4))
    for i in range(10):
        cold.put(generation(i, deadline_in_s=0.5))  # no estimate yet: the deadline decides later
    assert len(queue) == 2 and len(cold) == 10


def test_queued_generations_that_became_unreachable_are_taken_out_and_the_rest_keep_their_order():
    seen = SlotTurnover(slots=2)
    queue = RequestQueue(64, WorkerMetrics(CollectorRegistry()), turnover=seen)
    for i, deadline in enumerate((100, 9, 100, 17, 100)):
        queue.put(generation(i, deadline))  # admitted: no estimate yet
    queue.put(generation(9, 1, kind=SENTIMENT))
    for _ in range(SlotTurnover.MIN_SEEN):
        seen.observe(4.0, 100)  # a slot every 2 s; 4 s generating
    with queue.cond:
        assert queue.unreachable(time.monotonic(), free_slots=0) == []  # 1: 4 + 4 < 9; 3: 8 + 4 < 17
    for _ in range(20):
        seen.observe(10.0, 100)  # slower now: a slot every ~5 s, ~10 s generating
    with queue.cond:
        refused = queue.unreachable(time.monotonic(), free_slots=0)
    assert [work.id for work, _ in refused] == [1, 3]
    assert all(failure.code == "deadline_unreachable" for _, failure in refused)
    with queue.cond:
        batch: list[Work] = []
        queue.take(GENERATE, batch, 10)
    assert [work.id for work in batch] == [0, 2, 4] and len(queue) == 1
