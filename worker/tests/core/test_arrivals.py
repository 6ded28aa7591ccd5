"""An idle engine thread gathering a sentiment pass (core/arrivals.py) is woken when the pass is full, by
slots or by tokens, or when a generation arrives, not by every text of it."""
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from qwen_worker.core.arrivals import Arrivals, Work
from qwen_worker.engine import GenerationRow
from qwen_worker.engine.block_manager import BlockManager
from qwen_worker.engine.scheduler import Scheduler
from qwen_worker.metrics import WorkerMetrics
from qwen_worker.protocol import GENERATE, SENTIMENT, Request

from qaio_testing import eventually


def work(request_id: int, kind: str, prompt_tokens: int) -> Work:
    request = Request(request_id, kind, "chat", list(range(1, prompt_tokens + 1)), time.monotonic() + 600, 8)
    row = GenerationRow.scoring(request.prompt, request.deadline) if kind == SENTIMENT else \
        GenerationRow(request.prompt, 8, deadline=request.deadline)
    return Work(request, row)


@pytest.fixture()
def gathering():
    """Arrivals over an idle scheduler of 4 scoring slots and 64 tokens a step, its engine thread in next()
    (waiting an hour at most for a pass to fill), and a count of the wake-ups sent to it."""
    scheduler = Scheduler(4, 1000, 64, BlockManager(64, 4), score_slots=4)
    arrivals = Arrivals(64, WorkerMetrics(CollectorRegistry()), lambda: scheduler)
    wakes, notify = [], arrivals.cond.notify
    arrivals.cond.notify = lambda *a: (wakes.append(1), notify(*a))
    taken: list = []
    thread = threading.Thread(target=lambda: taken.append(arrivals.next(3600, lambda items: None)))
    thread.start()
    yield arrivals, wakes, taken, thread
    arrivals.stop()
    thread.join(10)


@pytest.mark.parametrize("kinds, tokens", [
    ([SENTIMENT] * 4, 3),  # the fourth text fills the 4 scoring slots
    ([SENTIMENT] * 3, 30),  # the third text's tokens reach the step's 64
    ([SENTIMENT, SENTIMENT, GENERATE], 3),  # a generation does not wait for a pass to fill
], ids=["slots", "tokens", "generation"])
def test_a_gathering_engine_thread_is_woken_by_the_arrival_that_ends_the_gather_not_by_each(gathering, kinds, tokens):
    arrivals, wakes, taken, thread = gathering
    arrivals.put(work(0, kinds[0], tokens))  # wakes the idle thread, which starts gathering
    eventually(lambda: arrivals._gathered is not None, what="the engine thread gathers a pass")
    for i, kind in enumerate(kinds[1:-1], 1):
        arrivals.put(work(i, kind, tokens))
    assert thread.is_alive() and len(wakes) == 1  # those arrivals woke nobody
    arrivals.put(work(len(kinds) - 1, kinds[-1], tokens))
    thread.join(30)
    assert [w.id for w in taken[0]] == list(range(len(kinds))) and len(wakes) == 2
