"""What the loop moves from the queue into scoring slots at once: bounded in prompt tokens, short requests
never stuck behind long ones, long ones in at most their share of the slots, urgent ones first, the
rest left queued in order."""
from prometheus_client import CollectorRegistry

from qwen_worker.core.queue import RequestQueue, Work
from qwen_worker.metrics import WorkerMetrics
from qwen_worker.protocol import GENERATE, SENTIMENT, Request

NOW = 1000.0


def work(request_id: int, tokens: int, kind: str = SENTIMENT, waited: float = 0.0, deadline_s: float = 15.0) -> Work:
    request = Request(request_id, kind, "sentiment", [1] * tokens, NOW - waited + deadline_s)
    return Work(request, enqueued_at=NOW - waited)


def queue_of(*items: Work) -> RequestQueue:
    queue = RequestQueue(64, WorkerMetrics(CollectorRegistry()))
    for item in items:
        queue.put(item)
    return queue


def take(queue: RequestQueue, limit: int = 16, budget: int = 1000, **long) -> list[int]:
    batch: list[Work] = []
    with queue.cond:
        queue.take_within(SENTIMENT, batch, limit, budget, NOW, **long)
    return [w.id for w in batch]


def test_short_requests_behind_a_bulk_of_long_ones_go_first_within_the_budget():
    queue = queue_of(*(work(i, 900) for i in range(4)), work(10, 110), work(11, 120), work(12, 100))
    assert take(queue) == [12, 10, 11]  # 330 tokens; a long one (900) would pass the budget of 1,000
    assert take(queue) == [0]  # then the long ones, one per pass, oldest first among equals
    assert len(queue) == 3


def test_a_request_over_the_budget_goes_alone_and_a_cheaper_one_may_fill_what_is_left():
    queue = queue_of(work(1, 3000), work(2, 600), work(3, 500), work(4, 300))
    assert take(queue, budget=1000) == [4, 3]  # 300 + 500; 600 would pass 1,000
    assert take(queue, budget=1000) == [2]
    assert take(queue, budget=1000) == [1]  # longer than any budget: alone, never stuck


def test_urgent_requests_first_then_the_limit_and_other_kinds_stay():
    queue = queue_of(work(1, 800, waited=8.0), work(2, 100), work(3, 100), work(4, 50, kind=GENERATE), work(5, 100))
    assert take(queue, limit=2) == [1, 2]  # 1 spent over half its deadline waiting: it goes before shorter ones
    assert take(queue, limit=2) == [3, 5]
    assert len(queue) == 1 and take(queue) == []  # the generation is not the scorer's


def test_long_requests_take_at_most_their_room_and_short_ones_pass_them():
    queue = queue_of(work(1, 900, waited=9.0), work(2, 300), work(3, 200), work(4, 20), work(5, 30))
    # Urgent or not, a request over long_tokens waits once long_room is spent; the short ones go on.
    assert take(queue, budget=10_000, long_tokens=100, long_room=1) == [1, 4, 5]
    assert take(queue, budget=10_000, long_tokens=100, long_room=0) == []
    assert take(queue, budget=10_000, long_tokens=100, long_room=2) == [3, 2]
