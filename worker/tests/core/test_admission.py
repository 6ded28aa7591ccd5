"""Admission by estimated finish: a generation that would not get a KV slot and generate its reply
before its deadline, by the slots' recent turnover, is refused when it arrives or as soon as the
estimate says so in the queue; nothing is refused before there is an estimate, nor when a slot is
free, and sentiment requests never by it."""
import time

import pytest
from prometheus_client import CollectorRegistry

from qwen_worker.core.admission import ScoringPace, SlotTurnover
from qwen_worker.core.arrivals import Arrivals, Work
from qwen_worker.engine import GenerationRow
from qwen_worker.engine.block_manager import BlockManager
from qwen_worker.engine.scheduler import Scheduler
from qwen_worker.metrics import WorkerMetrics
from qwen_worker.protocol import GENERATE, SENTIMENT, Request, RequestFailed


def turnover(slots: int = 4, hold_s: float = 10.0, tokens: int = 100) -> SlotTurnover:
    seen = SlotTurnover(slots)
    for _ in range(SlotTurnover.MIN_SEEN):
        seen.observe(hold_s, tokens)
    return seen


def generation(request_id: int, deadline_in_s: float, kind: str = GENERATE, max_tokens: int = 100) -> Work:
    request = Request(request_id, kind, "chat", [1, 2, 3], time.monotonic() + deadline_in_s, max_tokens)
    row = GenerationRow.scoring(request.prompt, request.deadline) if kind == SENTIMENT else \
        GenerationRow(request.prompt, max_tokens, deadline=request.deadline)
    return Work(request, row)


def scheduler(slots: int = 4, free: int = 0) -> Scheduler:
    """A scheduler of `slots` generation slots (and as many scoring slots), all but `free` of them taken."""
    taken = Scheduler(slots, 1000, 64, BlockManager(64, 4), score_slots=slots)
    for _ in range(slots - free):
        taken.admit(GenerationRow([1], 1))
        taken.admit(GenerationRow.scoring([1]))
    return taken


def arrivals(turnover: SlotTurnover | None = None, slots: int = 4, free: int = 0, capacity: int = 64) -> Arrivals:
    held = scheduler(slots, free)
    return Arrivals(capacity, WorkerMetrics(CollectorRegistry()), lambda: held, turnover)


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
    queue = arrivals(turnover(slots=4, hold_s=8.0))  # a slot frees every 2 s
    for i in range(3):
        queue.put(generation(i, deadline_in_s=60))
    with pytest.raises(RequestFailed) as err:
        queue.put(generation(3, deadline_in_s=15))  # fourth in line: 8 s waiting, then 8 s generating
    assert err.value.code == "deadline_unreachable" and "about 8 s waiting" in err.value.message
    queue.put(generation(4, deadline_in_s=17))  # fourth in line too (3 refused): 16 s
    queue.put(generation(5, deadline_in_s=12, max_tokens=10))  # fifth: 10 s waiting, then 10 tokens (0.8 s)
    queue.put(generation(6, deadline_in_s=1, kind=SENTIMENT))  # scored in passes, not by slots
    assert len(queue) == 6
    assert queue.metrics.registry.get_sample_value("qaio_rejections_total", {"reason": "deadline_unreachable"}) == 1


def test_rows_already_waiting_in_the_scheduler_count_as_ahead():
    queue = arrivals(turnover(slots=4, hold_s=8.0))
    for i in range(3):
        queue.scheduler.add(GenerationRow([1, 2], 10))
    with pytest.raises(RequestFailed):
        queue.put(generation(3, deadline_in_s=15))  # fourth in line, as above, though nothing has arrived


def test_free_slots_and_a_missing_estimate_admit():
    queue = arrivals(turnover(slots=4, hold_s=100.0), free=2)
    queue.put(generation(1, deadline_in_s=0.5))
    queue.put(generation(2, deadline_in_s=0.5))  # two slots are free: it may finish early, its deadline decides
    cold = arrivals(SlotTurnover(4))
    for i in range(10):
        cold.put(generation(i, deadline_in_s=0.5))  # no estimate yet: the deadline decides later
    assert len(queue) == 2 and len(cold) == 10


def test_a_full_queue_counts_what_waits_beyond_the_free_slots_of_its_kind():
    queue = arrivals(slots=2, free=1, capacity=2)
    queue.put(generation(1, 60))  # takes the free generation slot: not waiting
    queue.put(generation(2, 60, kind=SENTIMENT))  # the free scoring slot
    queue.put(generation(3, 60))
    queue.put(generation(4, 60, kind=SENTIMENT))
    with pytest.raises(RequestFailed) as full:
        queue.put(generation(5, 60, kind=SENTIMENT))
    assert full.value.code == "queue_full" and queue.waiting() == 4
    assert queue.metrics.registry.get_sample_value("qaio_rejections_total", {"reason": "queue_full"}) == 1


def test_waiting_generations_that_became_unreachable_are_refused_and_the_rest_keep_their_order():
    seen = SlotTurnover(slots=2)
    queue = arrivals(seen, slots=2)
    rows = [GenerationRow([1, 2], 100, deadline=time.monotonic() + deadline) for deadline in (100, 9, 100, 17, 100)]
    for row in rows:
        queue.scheduler.add(row)  # admitted: no estimate yet
    queue.scheduler.add(GenerationRow.scoring([1, 2], deadline=time.monotonic() + 1))
    for _ in range(SlotTurnover.MIN_SEEN):
        seen.observe(4.0, 100)  # a slot every 2 s; 4 s generating
    assert queue.unreachable(time.monotonic()) == []  # 1: 4 + 4 < 9; 3: 8 + 4 < 17
    for _ in range(20):
        seen.observe(10.0, 100)  # slower now: a slot every ~5 s, ~10 s generating
    refused = queue.unreachable(time.monotonic())
    assert [row for row, _ in refused] == [rows[1], rows[3]]
    assert all(failure.code == "deadline_unreachable" for _, failure in refused)


def test_the_scoring_pace_is_a_weighted_mean_of_passes_that_prefilled_for_scoring():
    pace = ScoringPace()
    for _ in range(ScoringPace.MIN_SEEN - 1):
        pace.observe(500, 1.0)
        assert pace.seconds(1000) is None
    pace.observe(0, 0.5)  # a pass that scored nothing says nothing of the pace
    assert pace.seconds(1000) is None
    pace.observe(500, 1.0)
    assert pace.seconds(1000) == pytest.approx(2.0)
    pace.observe(1500, 1.0)
    assert pace.tokens_per_s == pytest.approx(500 + ScoringPace.WEIGHT * 1000)


def scoring_row(tokens: int, deadline_in_s: float, first: int) -> GenerationRow:
    row = GenerationRow.scoring(list(range(first, first + tokens)), deadline=time.monotonic() + deadline_in_s)
    row.admitted_at = time.monotonic()
    return row


def test_waiting_texts_that_would_not_be_scored_before_their_deadline_are_refused_short_ones_kept():
    pace = ScoringPace()
    for _ in range(ScoringPace.MIN_SEEN):
        pace.observe(100, 1.0)  # 100 tokens a second
    queue = Arrivals(64, WorkerMetrics(CollectorRegistry()), lambda: held, pace=pace)
    held = Scheduler(1, 10_000, 64, BlockManager(4096, 4), score_slots=1)
    running = scoring_row(300, 60, first=1)
    held.admit(running)  # 300 tokens still to prefill ahead of every waiting text: 3 s
    bulk = [scoring_row(400, 10, first=1000 * (i + 1)) for i in range(3)]  # done in 7.2 s, then 11.2 s each
    short = scoring_row(20, 4, first=9000)  # goes first: 3.2 s
    for row in (*bulk, short):
        held.add(row)
    refused = queue.unreachable(time.monotonic())
    assert [row for row, _ in refused] == bulk[1:]  # the refused ones' tokens no longer count for those behind
    assert all(failure.code == "deadline_unreachable" and "texts ahead" in failure.message for _, failure in refused)
    assert queue.metrics.registry.get_sample_value("qaio_rejections_total", {"reason": "deadline_unreachable"}) == 2
    assert Arrivals(64, WorkerMetrics(CollectorRegistry()), lambda: held).unreachable(time.monotonic()) == []
    held.release(running)  # a free slot is no shortcut: the texts share the passes' tokens, not slots
    held.waiting_to_score.clear()
    doomed, fits = scoring_row(500, 2, first=20_000), scoring_row(150, 2, first=30_000)  # 5 s, 1.5 s; 2 s to go
    held.add(doomed)
    held.add(fits)
    assert [row for row, _ in queue.unreachable(time.monotonic())] == [doomed]
