"""Bounded request queue and the thread that turns it into model batches.

Request threads `submit` jobs and wait on them; one batcher thread takes the oldest job, gathers
more of the same kind (up to max batch size, or until batch_wait_ms has passed), drops any whose
deadline has already passed, and runs the batch: sentiment as one forward pass, chat as one
batched generation.

With `QAIO_GENERATION=continuous` generation jobs are instead handed, as soon as the continuous
batch has a free row, to ContinuousGeneration, which answers them from its own thread; sentiment
batches then run while its generation loop is paused between two steps.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from .errors import ApiError
from .continuous import ContinuousGeneration
from .generation import GenerationRow
from .health import Health
from .metrics import WorkerMetrics
from .model import ModelService, free_device_cache, is_oom

log = logging.getLogger(__name__)

SENTIMENT = "sentiment"
GENERATE = "generate"
RUNNING_GRACE_S = 5.0


@dataclasses.dataclass
class Job:
    kind: str  # SENTIMENT or GENERATE: what can share a batch
    task: str  # the API task it serves, for metrics and logs
    payload: Any  # sentiment: prompt ids; generate: GenerationRow
    deadline: float  # time.monotonic()
    future: Future = dataclasses.field(default_factory=Future)
    withdraw: Callable[["Job"], bool] | None = None  # takes a still-queued job out of the queue
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    batch_size: int = 0

    @property
    def queue_ms(self) -> float:
        end = self.started_at if self.started_at is not None else time.monotonic()
        return (end - self.enqueued_at) * 1000

    @property
    def compute_ms(self) -> float:
        if self.started_at is None:
            return 0.0
        return ((self.finished_at or time.monotonic()) - self.started_at) * 1000

    def wait_budget(self) -> float:
        """Seconds to keep waiting: until the deadline, plus a grace once running, since a running
        generation is stopped by its stopping criterion at the deadline."""
        budget = self.deadline - time.monotonic()
        if self.started_at is not None:
            budget += RUNNING_GRACE_S
        return max(budget, 0.01)  # a job the batcher is about to start is polled, not spun on

    def give_up(self) -> bool:
        """At the end of the wait budget: True to answer 504 now (a queued job is withdrawn first);
        False when the batcher took the job this instant, so its budget now includes the grace."""
        if self.started_at is None and self.withdraw is not None and not self.withdraw(self):
            return False
        return True

    def wait(self) -> Any:
        """The job's result; ApiError when it failed or its deadline passed."""
        while True:
            try:
                return self.future.result(timeout=self.wait_budget())
            except TimeoutError:
                if self.give_up():
                    raise deadline_error() from None


def deadline_error() -> ApiError:
    return ApiError(504, "deadline_exceeded", "the request's deadline passed before it completed")


class Batcher:
    def __init__(self, model: ModelService, config, metrics: WorkerMetrics, health: Health):
        self.model = model
        self.config = config
        self.metrics = metrics
        self.health = health
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.continuous: ContinuousGeneration | None = None

    # ---- request side -------------------------------------------------------------------------
    def check_accepting(self) -> None:
        if not self.health.accepting():
            self.metrics.rejected("not_ready")
            raise ApiError(503, "not_ready", "the model is not ready", retry_after=self.config.retry_after_s)

    def submit(self, job: Job) -> Job:
        self.check_accepting()
        with self._cond:
            if len(self._queue) >= self.config.queue_capacity:
                self.metrics.rejected("queue_full")
                raise ApiError(503, "queue_full", "too many requests are waiting for the model",
                               retry_after=self.config.retry_after_s)
            job.withdraw = self._withdraw
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return job

    def _withdraw(self, job: Job) -> bool:
        """Take a job out of the queue if it is still there (its deadline passed before it ran)."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self.metrics.queue_depth.set(len(self._queue))
        self.metrics.rejected("deadline_in_queue")
        return True

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    # ---- batcher thread -----------------------------------------------------------------------
    def start(self) -> None:
        if self.config.generation == "continuous":
            self.continuous = ContinuousGeneration(self.model, self.config.max_batch_size,
                                                   self.config.continuous_cache_tokens)
            self.continuous.start()
            self._warm_up_continuous()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def _warm_up_continuous(self) -> None:
        """One short row through the continuous batch, so a broken setup fails the load, not a request."""
        done = threading.Event()
        outcome: list[Exception | None] = []

        def on_done(row: GenerationRow, error: Exception | None) -> None:
            outcome.append(error)
            done.set()

        self.continuous.submit(GenerationRow(self.model.prompter.chat_ids([]), max_new_tokens=2), on_done)
        if not done.wait(timeout=300):
            raise RuntimeError("continuous batching warm-up did not finish")
        if outcome[0] is not None:
            raise outcome[0]

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.continuous is not None:
            self.continuous.stop()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _free_generation_slots(self) -> int:
        return self.continuous.free_slots() if self.continuous is not None else 0

    def _runnable_kind(self) -> str | None:
        """The kind of batch to run next: the oldest job's; in continuous mode generation jobs go first
        while the continuous batch has room (handing them over takes no time) and wait otherwise."""
        if self.continuous is None:
            return self._queue[0].kind if self._queue else None
        kinds = {job.kind for job in self._queue}
        if GENERATE in kinds and self._free_generation_slots() > 0:
            return GENERATE
        return SENTIMENT if SENTIMENT in kinds else None

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._stopping and (kind := self._runnable_kind()) is None:
                self._cond.wait()
            if self._stopping:
                return None
            batch: list[Job] = []
            if kind == GENERATE and self.continuous is not None:
                self._take(kind, batch, self._free_generation_slots())
            else:
                wait_ms = self.config.batch_wait_ms if kind == SENTIMENT else self.config.chat_batch_wait_ms
                gather_until = time.monotonic() + wait_ms / 1000
                while True:
                    self._take(kind, batch, self.config.max_batch_size)
                    remaining = gather_until - time.monotonic()
                    if len(batch) >= self.config.max_batch_size or remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
            self.metrics.queue_depth.set(len(self._queue))
        return self._drop_expired(batch)

    def _take(self, kind: str, batch: list[Job], limit: int) -> None:
        """Move queued jobs of `kind`, oldest first, into batch until it holds `limit`."""
        kept = collections.deque()
        while self._queue:
            job = self._queue.popleft()
            if job.kind == kind and len(batch) < limit:
                batch.append(job)
            else:
                kept.append(job)
        self._queue = kept

    def _drop_expired(self, batch: list[Job]) -> list[Job]:
        now = time.monotonic()
        live = []
        for job in batch:
            if now >= job.deadline:
                self.metrics.rejected("deadline_in_queue")
                job.future.set_exception(deadline_error())
            else:
                live.append(job)
        return live

    def _execute(self, batch: list[Job]) -> None:
        started = time.monotonic()
        for job in batch:
            job.started_at = started
            job.batch_size = len(batch)
        kind = batch[0].kind
        if kind == GENERATE and self.continuous is not None:
            for job in batch:
                self.continuous.submit(job.payload, lambda row, error, job=job: self._continuous_done(job, error))
            # The rows generating together from now on: the continuous batch's size as each request joins it.
            self.metrics.batch_size.labels(kind=GENERATE).observe(self.continuous.in_flight())
            return
        try:
            if kind == SENTIMENT:
                paused = self.continuous.paused() if self.continuous is not None else contextlib.nullcontext()
                with paused:
                    results: list[Any] = self.model.score_sentiment([job.payload for job in batch])
            else:
                rows: list[GenerationRow] = [job.payload for job in batch]
                self.model.generate(rows, between_steps=self._sentiment_between_steps)
                results = rows
        except Exception as exc:  # a model failure fails this batch, never the process
            self._fail(batch, exc)
            return
        finished = time.monotonic()
        self.health.record_success()
        self.metrics.observe_batch(kind, batch, finished - started)
        for job, result in zip(batch, results):
            job.finished_at = finished
            job.future.set_result(result)

    def _continuous_done(self, job: Job, error: Exception | None) -> None:
        """Called from the continuous dispatcher thread when one handed-over job ends."""
        if error is not None:
            self._fail([job], error)
        else:
            job.finished_at = time.monotonic()
            self.health.record_success()
            self.metrics.observe_batch(GENERATE, [job], job.finished_at - job.started_at, size_observed=True)
            job.future.set_result(job.payload)
        with self._cond:
            self._cond.notify()  # a row of the continuous batch is free again

    def _sentiment_between_steps(self) -> None:
        """Run the sentiment requests waiting now (no gathering) inside a running generation."""
        with self._cond:
            if not any(job.kind == SENTIMENT for job in self._queue):
                return
            batch: list[Job] = []
            self._take(SENTIMENT, batch, self.config.max_batch_size)
            self.metrics.queue_depth.set(len(self._queue))
        batch = self._drop_expired(batch)
        if batch:
            self._execute(batch)

    def _fail(self, batch: list[Job], exc: Exception) -> None:
        finished = time.monotonic()
        if is_oom(exc):
            free_device_cache(self.model.device)
            error = ApiError(503, "out_of_memory", "the model ran out of device memory; retry with a smaller request",
                             retry_after=self.config.retry_after_s)
            reason = "out_of_memory"
        else:
            # exc_info from the exception itself: continuous-batch failures arrive outside an except block.
            log.error("model failure in a batch of %d", len(batch), exc_info=exc)
            error = ApiError(503, "model_error", "the model failed on this batch", retry_after=self.config.retry_after_s)
            reason = "model_error"
        self.metrics.model_failures.labels(reason=reason).inc()
        self.health.record_failure()
        for job in batch:
            job.finished_at = finished
            job.future.set_exception(error)
