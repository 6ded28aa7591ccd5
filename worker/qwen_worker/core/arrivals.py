"""Requests on their way into the engine: handed over by other threads, checked against what waits, and
taken by the engine thread, which adds them to the scheduler (the one owner of waiting and running
requests). Each request's state on the engine side is a Work."""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

from ..engine import GenerationRow
from ..engine.scheduler import Scheduler
from ..metrics import WorkerMetrics
from ..protocol import GENERATE, SENTIMENT, Request, RequestFailed
from .admission import UNREACHABLE, ScoringPace, SlotTurnover, unreachable, unreachable_score


@dataclasses.dataclass(eq=False)
class Work:
    """A request as the engine holds it: arrived, then waiting for a slot, then scoring or generating."""

    request: Request
    row: GenerationRow  # what the engine computes; cancelling it works wherever the request is
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None  # when its row took a slot
    sent: int = 0  # generated tokens already sent in earlier outputs
    stream_due: float = 0.0  # a stream's next tokens go out from then on (Outbox)
    first_token_at: float | None = None  # the end of the step that produced its first token
    batch_size: int = 0
    cancel_reason: str = "client_gone"  # counted if it leaves before it holds a slot

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def kind(self) -> str:
        return self.request.kind


class Arrivals:
    """Requests not yet in the engine; `cond` is the engine thread's wake-up.

    A request is refused on arrival when `capacity` requests already wait beyond the free slots of their
    kind (requests the engine thread has not yet moved into free slots are not waiting for one, else a
    burst arriving faster than the engine thread wakes would be refused with slots free), and, with
    `turnover`, a generation that would not get a slot and finish before its deadline (admission.py).
    Other threads read only the scheduler's counts."""

    def __init__(self, capacity: int, metrics: WorkerMetrics, scheduler: Callable[[], Scheduler],
                 turnover: SlotTurnover | None = None, pace: ScoringPace | None = None):
        self.capacity = capacity
        self.metrics = metrics
        self._scheduler = scheduler  # the engine's, once the model has loaded
        self.turnover = turnover
        self.pace = pace
        self.cond = threading.Condition()
        self._items: list[Work] = []
        self._generations = 0  # generations among _items
        # While the engine thread, idle, waits in next() for a sentiment pass to fill: the own tokens of
        # the sentiment requests arrived (None otherwise). An arrival then wakes it only once the pass is
        # full, not at every request of it.
        self._gathered: int | None = None
        self.stopping = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler()

    def waiting(self) -> int:
        """Requests without a slot: arrived, or in the scheduler's waiting rows."""
        return len(self._items) + len(self.scheduler.waiting) + len(self.scheduler.waiting_to_score)

    def put(self, work: Work) -> None:
        with self.cond:
            scheduler = self.scheduler
            generations = self._generations
            beyond_free = max(generations + len(scheduler.waiting) - scheduler.free_slots(), 0) + max(
                len(self._items) - generations + len(scheduler.waiting_to_score) - scheduler.free_score_slots(), 0)
            if beyond_free >= self.capacity:
                self.metrics.rejected("queue_full")
                raise RequestFailed("queue_full", "too many requests are waiting for the model")
            if work.kind == GENERATE:
                position = generations + len(scheduler.waiting) + 1 - scheduler.free_slots()
                refusal = self.refusal(work.request.max_tokens, work.request.deadline, position, time.monotonic())
                if refusal is not None:
                    raise refusal
            self._items.append(work)
            self._generations += work.kind == GENERATE
            self.publish_depth()
            if self._gathered is not None and work.kind == SENTIMENT:
                # The engine thread is parked in next(), its scheduler idle: counting the row's own tokens is safe.
                self._gathered += scheduler.own_tokens(work.row)
                if self._gathering(scheduler):
                    return
            self.cond.notify()

    def remove(self, request_id: int) -> Work | None:
        """Take a request out if the engine thread has not taken it yet (caller holds cond)."""
        for work in self._items:
            if work.id == request_id:
                self._items.remove(work)
                self._generations -= work.kind == GENERATE
                if self._gathered is not None and work.kind == SENTIMENT:
                    self._gathered -= max(work.row.own_tokens, 0)
                self.publish_depth()
                return work
        return None

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def next(self, gather_s: float, on_take: Callable[[list[Work]], None]) -> list[Work] | None:
        """What arrived since the last pass, waiting for something when the engine has nothing to do
        (engine thread); None when stopping. `on_take` sees them before cond is let go. An idle engine
        given only sentiment requests waits up to `gather_s` for a pass of them."""
        scheduler = self.scheduler
        with self.cond:
            while not self.stopping and not self._items and not scheduler.has_rows():
                self.cond.wait()
            if not scheduler.has_rows() and not self._generations:
                gather_until = time.monotonic() + gather_s
                self._gathered = sum(scheduler.own_tokens(work.row) for work in self._items)
                try:
                    while not self.stopping and self._gathering(scheduler) and time.monotonic() < gather_until:
                        self.cond.wait(gather_until - time.monotonic())
                finally:
                    self._gathered = None
            if self.stopping:
                return None
            arrived = self.take()
            on_take(arrived)
            return arrived

    def _gathering(self, scheduler: Scheduler) -> bool:
        """Only sentiment requests arrived, fewer than a pass holds: fewer than the scoring slots, and
        fewer tokens past the cached prefix than a step's budget (caller holds cond, in a gather)."""
        return not self._generations and len(self._items) < scheduler.score_allocator.total and \
            self._gathered < scheduler.prefill_tokens_per_step

    def take(self) -> list[Work]:
        """Every arrived request, oldest first (caller holds cond)."""
        items, self._items = self._items, []
        self._generations = 0
        return items

    def unreachable(self, now: float) -> list[tuple[GenerationRow, RequestFailed]]:
        """Rows waiting in the scheduler that would no longer finish before their deadline, with their
        refusal, counted (engine thread): generations by the slots' turnover, in line for a slot; scoring
        rows by the scoring pace, behind the tokens of the texts that go before them. An estimate may have
        grown since they arrived."""
        scheduler = self.scheduler
        refused, position = [], 1 - scheduler.free_slots()
        for row in list(scheduler.waiting):
            refusal = self.refusal(row.max_new_tokens, row.deadline, position, now)
            if refusal is None:
                position += 1
            else:
                refused.append((row, refusal))
        if self.pace is None or not scheduler.waiting_to_score:
            return refused
        # Scoring is bounded by the step's tokens, not by its slots: a text with a free slot still shares
        # the passes with those in slots (a bulk request's last texts arrive with little time left).
        ahead = scheduler.scoring_tokens_left()
        for row in scheduler.scoring_order(now):
            ahead += row.own_tokens
            wait_s = self.pace.seconds(ahead)
            if wait_s is not None and now + wait_s > row.deadline:
                self.metrics.rejected(UNREACHABLE)
                refused.append((row, unreachable_score(wait_s)))
                ahead -= row.own_tokens
        return refused

    def refusal(self, max_tokens: int, deadline: float, position: int, now: float) -> RequestFailed | None:
        """A generation `position`-th in line for a slot (0 or less: one is free) refused, and counted,
        when it would not finish before its deadline; one that gets a slot at once never is."""
        if self.turnover is None or position <= 0:
            return None
        estimate = self.turnover.finish_s(position, max_tokens)
        if estimate is None or now + sum(estimate) <= deadline:
            return None
        self.metrics.rejected(UNREACHABLE)
        return unreachable(*estimate)

    def publish_depth(self) -> None:
        self.metrics.queue_depth.set(self.waiting())
