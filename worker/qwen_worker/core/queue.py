"""The engine's bounded queue of requests not yet taken, and each request's state on the engine side."""
from __future__ import annotations

import collections
import dataclasses
import threading
import time

from ..engine import GenerationRow
from ..metrics import WorkerMetrics
from ..protocol import GENERATE, Request, RequestFailed
from .admission import UNREACHABLE, SlotTurnover, unreachable


@dataclasses.dataclass(eq=False)
class Work:
    """A request as the engine holds it: queued, then scoring or generating."""

    request: Request
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None
    row: GenerationRow | None = None  # a generation's row once it holds a slot
    sent: int = 0  # generated tokens already sent in earlier outputs
    first_token_at: float | None = None  # the end of the step that produced its first token
    batch_size: int = 0
    # Prompt tokens its prefill computes: its prompt less the cached instruction prefix (the loop sets it
    # for sentiment requests at submission; by default the whole prompt).
    pass_tokens: int = -1

    def __post_init__(self) -> None:
        if self.pass_tokens < 0:
            self.pass_tokens = len(self.request.prompt)

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def kind(self) -> str:
        return self.request.kind


class RequestQueue:
    """FIFO per kind, bounded in requests; `cond` is the engine thread's wake-up.

    `free_slots()` counts slots no generation holds: requests the engine thread has not yet moved
    into free slots are not waiting for one, so they do not count against `capacity` (else a burst
    arriving faster than the engine thread wakes would be refused with slots free). With `turnover`, a
    generation that would not get a slot before its deadline is refused (admission.py)."""

    def __init__(self, capacity: int, metrics: WorkerMetrics, free_slots=lambda: 0,
                 turnover: SlotTurnover | None = None):
        self.capacity = capacity
        self.metrics = metrics
        self.free_slots = free_slots
        self.turnover = turnover
        self.cond = threading.Condition()
        self._items: collections.deque[Work] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, work: Work) -> None:
        with self.cond:
            if len(self._items) >= self.capacity + self.free_slots():
                self.metrics.rejected("queue_full")
                raise RequestFailed("queue_full", "too many requests are waiting for the model")
            if work.kind == GENERATE:
                position = sum(1 for queued in self._items if queued.kind == GENERATE) + 1 - self.free_slots()
                refusal = self._refusal(work, position, time.monotonic())
                if refusal is not None:
                    raise refusal
            self._items.append(work)
            self._changed()
            self.cond.notify()

    def remove(self, request_id: int) -> Work | None:
        """Take a request out if it is still queued."""
        with self.cond:
            for work in self._items:
                if work.id == request_id:
                    self._items.remove(work)
                    self._changed()
                    return work
        return None

    def has(self, kind: str) -> bool:
        """Caller holds cond."""
        return any(work.kind == kind for work in self._items)

    def take(self, kind: str, batch: list[Work], limit: int) -> None:
        """Move queued requests of `kind`, oldest first, into batch until it holds `limit` (caller holds cond)."""
        if len(batch) >= limit:
            return
        kept: collections.deque[Work] = collections.deque()
        while self._items:
            work = self._items.popleft()
            if work.kind == kind and len(batch) < limit:
                batch.append(work)
            else:
                kept.append(work)
        self._items = kept
        self._changed()

    def take_within(self, kind: str, batch: list[Work], limit: int, budget: int, now: float,
                    long_tokens: int | None = None, long_room: int = 0) -> int:
        """Move queued requests of `kind` into batch while the tokens their prefill computes (Work.pass_tokens)
        stay within `budget` and it holds fewer than `limit` (caller holds cond). Urgent requests first (half
        their deadline spent waiting), oldest first; then the shortest, so that a short request is never
        stuck behind a queue of long ones; a request over what is left is skipped for a shorter one. An empty
        batch always takes its first request, whatever its size. With `long_tokens`, at most `long_room`
        requests of more tokens are taken. Returns the batch's tokens."""
        def urgent(work: Work) -> bool:
            return now - work.enqueued_at >= (work.request.deadline - work.enqueued_at) / 2

        candidates = [work for work in self._items if work.kind == kind]
        ordered = [w for w in candidates if urgent(w)] + sorted((w for w in candidates if not urgent(w)),
                                                                 key=lambda w: w.pass_tokens)
        spent = sum(work.pass_tokens for work in batch)
        chosen: set[int] = set()
        for work in ordered:
            if len(batch) >= limit or (batch and spent >= budget):
                break
            size = work.pass_tokens
            if batch and spent + size > budget:
                continue
            if long_tokens is not None and size > long_tokens:
                if long_room <= 0:
                    continue
                long_room -= 1
            batch.append(work)
            chosen.add(id(work))
            spent += size
        if chosen:
            self._items = collections.deque(work for work in self._items if id(work) not in chosen)
            self._changed()
        return spent

    def unreachable(self, now: float, free_slots: int) -> list[tuple[Work, RequestFailed]]:
        """Queued generations that would not get a slot before their deadline, taken out, with their
        refusal (caller holds cond): the estimate may have grown since they were admitted."""
        refused, position = [], 1 - free_slots
        for work in [w for w in self._items if w.kind == GENERATE]:
            refusal = self._refusal(work, position, now)
            if refusal is not None:
                self._items.remove(work)
                refused.append((work, refusal))
            else:
                position += 1
        if refused:
            self._changed()
        return refused

    def _refusal(self, work: Work, position: int, now: float) -> RequestFailed | None:
        """A generation `position`-th in line for a slot (0 or less: one is free) refused, and counted,
        when it would not finish before its deadline; one that gets a slot at once never is."""
        if self.turnover is None or position <= 0:
            return None
        estimate = self.turnover.finish_s(position, work.request.max_tokens)
        if estimate is None or now + sum(estimate) <= work.request.deadline:
            return None
        self.metrics.rejected(UNREACHABLE)
        return unreachable(*estimate)

    def drain_all(self) -> list[Work]:
        with self.cond:
            items, self._items = list(self._items), collections.deque()
            self._changed()
        return items

    def _changed(self) -> None:
        self.metrics.queue_depth.set(len(self._items))
