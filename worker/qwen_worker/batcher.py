"""Bounded request queue and the one thread that runs the engine.

Request threads `submit` jobs and wait on them. The engine thread loops: it hands queued generation
jobs to the engine while it has free KV slots (a job joins the running batch at the next step), runs
the sentiment jobs waiting now as one scoring pass between two decode steps (an idle worker first
waits batch_wait_ms to fill it), and then runs one engine step. Jobs whose deadline passes while
queued are withdrawn and answered 504 at once.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from .errors import ApiError
from .engine.engine import RowFailed, StepFailed
from .health import Health
from .metrics import WorkerMetrics
from .model import ModelService, free_device_cache, is_fatal_device_error, is_oom

log = logging.getLogger(__name__)

SENTIMENT = "sentiment"
GENERATE = "generate"
RUNNING_GRACE_S = 5.0
CLIENT_POLL_S = 0.1  # how often a waiting request checks that its client is still connected
SWITCH_INTERVAL_S = 0.0005
# A row the engine refuses (RowFailed.code) is the client's request, never the model's failure.
ROW_ERRORS = {"prompt_too_long": 413, "invalid_token_id": 400}


@dataclasses.dataclass
class Job:
    kind: str  # SENTIMENT or GENERATE: what can share a batch
    task: str  # the API task it serves, for metrics and logs
    payload: Any  # sentiment: prompt ids; generate: GenerationRow
    deadline: float  # time.monotonic()
    future: Future = dataclasses.field(default_factory=Future)
    withdraw: Callable[..., bool] | None = None  # takes a still-queued job out of the queue
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    batch_size: int = 0

    def cancel(self, reason: str = "client_gone") -> bool:
        """Its client went away: a queued job leaves the queue (True), a running generation stops at
        the next step (a running sentiment pass is too short to stop)."""
        if self.started_at is None and self.withdraw is not None and self.withdraw(self, reason):
            return True
        if self.kind == GENERATE:
            self.payload.cancelled.set()
        return False

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
        # Polled, not spun on, when about to start; at most an hour per wait (an infinite timeout overflows).
        return min(max(budget, 0.01), 3600.0)

    def give_up(self) -> bool:
        """At the end of the wait budget: True to answer 504 now (a queued job is withdrawn first);
        False when the batcher took the job this instant, so its budget now includes the grace."""
        if self.started_at is None and self.withdraw is not None and not self.withdraw(self):
            return False
        return True

    def wait(self, client_gone: Callable[[], bool] | None = None) -> Any:
        """The job's result; ApiError when it failed, its deadline passed, or its client left."""
        return self.wait_for(lambda timeout: self.future.result(timeout=timeout), TimeoutError, client_gone)

    def wait_for(self, get: Callable[[float], Any], timed_out: type[Exception],
                 client_gone: Callable[[], bool] | None = None) -> Any:
        """`get(timeout)` (raising `timed_out` when nothing came) until it returns, on this job's behalf:
        504 when its deadline passes, 499 (and the job cancelled) when `client_gone`, checked every
        CLIENT_POLL_S, says its client left."""
        while True:
            budget = self.wait_budget()
            timeout = min(budget, CLIENT_POLL_S) if client_gone is not None else budget
            try:
                return get(timeout)
            except timed_out:
                if client_gone is not None and client_gone():
                    self.cancel()
                    raise client_gone_error() from None
                if timeout >= budget and self.give_up():
                    raise deadline_error() from None


def deadline_error() -> ApiError:
    return ApiError(504, "deadline_exceeded", "the request's deadline passed before it completed")


def check_accepting(health, metrics: WorkerMetrics, retry_after_s: int, drain: bool = True) -> None:
    """503 draining or not_ready (counted) unless the model takes requests; `drain`: whether this
    process decides about draining (an API process leaves it to its engine)."""
    if health.broken:
        metrics.rejected("not_ready")
        raise device_error(retry_after_s)
    if drain and health.draining:
        metrics.rejected("draining")
        raise ApiError(503, "draining", "this instance is draining and takes no new requests; retry on another",
                       retry_after=retry_after_s)
    if not health.accepting():
        metrics.rejected("not_ready")
        raise ApiError(503, "not_ready", "the model is not ready", retry_after=retry_after_s)


def device_error(retry_after_s: int) -> ApiError:
    return ApiError(503, "device_error", "the model's device failed; this instance is restarting, retry on another",
                    retry_after=retry_after_s)


def client_gone_error() -> ApiError:
    """Answered to nobody (the client left); 499 as nginx logs it, for the access log and metrics."""
    return ApiError(499, "client_closed_request", "the client closed the connection before the answer")


class Batcher:
    def __init__(self, model: ModelService, config, metrics: WorkerMetrics, health: Health):
        self.model = model
        # Called on the engine thread after each pass (the engine server sends what the pass produced).
        self.after_pass: Callable[[], None] = lambda: None
        self.config = config
        self.metrics = metrics
        self.health = health
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._scoring = 0  # sentiment texts in the pass running now
        self.device_error: Exception | None = None  # a sticky device error: the engine thread stopped on it
        # Generations a failed pass took down, answered once the failure is counted (metrics, health),
        # so that a client told 503 finds /readyz and /metrics saying why.
        self._failed: list[tuple[Job, Exception]] = []
        # What to do after a sticky device error, once its requests are answered: end this process, so
        # that its supervisor (gunicorn's master, compose, Kubernetes) starts a fresh one (None: stay).
        self.on_device_error: Callable[[], None] | None = None

    @property
    def engine(self):
        return self.model.engine

    # ---- request side -------------------------------------------------------------------------
    def check_accepting(self) -> None:
        check_accepting(self.health, self.metrics, self.config.retry_after_s)

    def submit(self, job: Job) -> Job:
        self.check_accepting()
        with self._cond:
            if self.device_error is not None:  # the engine thread has ended (or is ending) on it
                raise device_error(self.config.retry_after_s)
            if len(self._queue) >= self.config.queue_capacity:
                self.metrics.rejected("queue_full")
                raise ApiError(503, "queue_full", "too many requests are waiting for the model",
                               retry_after=self.config.retry_after_s)
            job.withdraw = self._withdraw
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return job

    def _withdraw(self, job: Job, reason: str = "deadline_in_queue") -> bool:
        """Take a job out of the queue if it is still there (its deadline passed, or its client left)."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self.metrics.queue_depth.set(len(self._queue))
        self.metrics.rejected(reason)
        return True

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def busy(self) -> int:
        """Requests this instance holds: queued, or generating (what a drain waits for)."""
        engine = self.model.engine
        return self.depth() + self._scoring + (engine.live() if engine is not None else 0)

    # ---- engine thread ------------------------------------------------------------------------
    def start(self) -> None:
        # The engine thread gives up the GIL at every device call; with hundreds of HTTP threads runnable,
        # Python's default 5 ms switch interval would let each of those hand-backs cost up to 5 ms.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        engine = self.engine
        stopping = ApiError(503, "not_ready", "the worker is stopping", retry_after=self.config.retry_after_s)
        try:
            while self.device_error is None:
                work = self._next_work()
                if work is None:
                    return
                generation, sentiment = work
                for job in generation:
                    self._start_generation(job)
                if sentiment:
                    self._execute_sentiment(sentiment)
                if engine.has_work() and self.device_error is None:
                    self._step()
                self.metrics.live_slots.set(engine.live())
                self.after_pass()
        finally:
            error = device_error(self.config.retry_after_s) if self.device_error is not None else stopping
            engine.fail_all(error)
            self._answer_failed()
            self._fail_queued(error)
            self.after_pass()
        if self.device_error is not None and self.on_device_error is not None:
            self.on_device_error()

    def _fail_queued(self, error: ApiError) -> None:
        """The engine thread ends: nothing queued will ever run, so answer it now."""
        with self._cond:
            queued, self._queue = list(self._queue), collections.deque()
            self.metrics.queue_depth.set(0)
        for job in queued:
            job.finished_at = time.monotonic()
            job.future.set_exception(error)

    def _next_work(self) -> tuple[list[Job], list[Job]] | None:
        """Generation jobs for the free slots and the sentiment jobs to score now; None when stopping."""
        engine = self.engine
        with self._cond:
            while not self._stopping and not self._queue and not engine.has_work():
                self._cond.wait()
            if self._stopping:
                return None
            generation: list[Job] = []
            self._take(GENERATE, generation, engine.free_slots())
            sentiment: list[Job] = []
            if any(job.kind == SENTIMENT for job in self._queue):
                # Idle: worth waiting a little to fill the pass. Busy: the decode steps must go on.
                gather_until = time.monotonic() + self.config.batch_wait_ms / 1000
                while True:
                    self._take(SENTIMENT, sentiment, self.config.max_batch_size)
                    remaining = gather_until - time.monotonic()
                    if engine.has_work() or generation or len(sentiment) >= self.config.max_batch_size \
                            or remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
            self.metrics.queue_depth.set(len(self._queue))
        return self._drop_expired(generation), self._drop_expired(sentiment)

    def _take(self, kind: str, batch: list[Job], limit: int) -> None:
        """Move queued jobs of `kind`, oldest first, into batch until it holds `limit`."""
        if len(batch) >= limit:
            return
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

    def _start_generation(self, job: Job) -> None:
        job.started_at = time.monotonic()
        try:
            self.engine.add(job.payload, lambda row, error, job=job: self._generation_done(job, error))
        except RowFailed as refused:  # a row the engine's tables cannot hold fails alone
            self._refuse(job, refused)
            return
        except Exception as exc:
            self._fail([job], exc)
            return
        job.batch_size = self.engine.live()  # the rows generating together as this one joins
        self.metrics.batch_size.labels(kind=GENERATE).observe(job.batch_size)

    def _step(self) -> None:
        try:
            self.engine.step()
        except StepFailed as failure:  # its rows came back through _generation_done
            self._after_failure(failure.cause, len(failure.rows))
        finally:
            self._answer_failed()

    def _answer_failed(self) -> None:
        failed, self._failed = self._failed, []
        for job, error in failed:
            job.future.set_exception(self._api_error(error))

    def _generation_done(self, job: Job, error: Exception | None) -> None:
        """Called on the engine thread when a generation ends."""
        job.finished_at = time.monotonic()
        if error is not None:
            self._failed.append((job, error))  # answered by _answer_failed, after the failure is counted
            return
        self.health.record_success()
        self.metrics.observe_batch(GENERATE, [job], job.finished_at - job.started_at, size_observed=True)
        job.future.set_result(job.payload)

    def _refuse(self, job: Job, refused: RowFailed) -> None:
        self.metrics.rejected(refused.code)
        job.finished_at = time.monotonic()
        job.future.set_exception(self._api_error(refused))

    def _admissible(self, batch: list[Job]) -> list[Job]:
        """The sentiment jobs the engine can score; the others are refused one by one, so a text too long
        for the position table never takes its pass (and the innocent texts in it) down."""
        admitted = []
        for job in batch:
            try:
                self.engine.check_score_prompt(job.payload)
            except RowFailed as refused:
                self._refuse(job, refused)
                continue
            admitted.append(job)
        return admitted

    def _execute_sentiment(self, batch: list[Job]) -> None:
        batch = self._admissible(batch)
        if not batch:
            return
        started = time.monotonic()
        for job in batch:
            job.started_at = started
            job.batch_size = len(batch)
        self._scoring = len(batch)
        try:
            results = self.model.score_sentiment([job.payload for job in batch])
        except Exception as exc:  # a model failure fails this batch, never the process
            self._fail(batch, exc)
            return
        finally:
            self._scoring = 0
        finished = time.monotonic()
        self.health.record_success()
        self.metrics.observe_batch(SENTIMENT, batch, finished - started)
        for job, result in zip(batch, results):
            job.finished_at = finished
            job.future.set_result(result)

    def _api_error(self, exc: Exception) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, RowFailed):
            return ApiError(ROW_ERRORS.get(exc.code, 400), exc.code, str(exc))
        if is_fatal_device_error(exc):
            return device_error(self.config.retry_after_s)
        if is_oom(exc):
            return ApiError(503, "out_of_memory", "the model ran out of device memory; retry with a smaller request",
                            retry_after=self.config.retry_after_s)
        return ApiError(503, "model_error", "the model failed on this batch", retry_after=self.config.retry_after_s)

    def _after_failure(self, exc: Exception, size: int) -> None:
        if is_fatal_device_error(exc):
            self._device_failed(exc, size)
            return
        if is_oom(exc):
            free_device_cache(self.model.device)
            reason = "out_of_memory"
        else:
            log.error("model failure in a batch of %d", size, exc_info=exc)
            reason = "model_error"
        self.metrics.model_failures.labels(reason=reason).inc()
        self.health.record_failure()

    def _device_failed(self, exc: Exception, size: int) -> None:
        """A device error that is not an out-of-memory (illegal access, device-side assert) leaves the
        CUDA context unusable for good: stop the engine (what it holds is answered 503 as the thread
        ends), and fail /healthz and /readyz so that the instance is replaced."""
        log.critical("sticky device error in a batch of %d: the engine stops and this instance must be "
                     "restarted", size, exc_info=exc)
        self.metrics.model_failures.labels(reason="device_error").inc()
        self.device_error = exc
        self.health.mark_broken(f"device error: {type(exc).__name__}: {str(exc).strip()[:200]}")
        self.metrics.ready.set(0)

    def _fail(self, batch: list[Job], exc: Exception) -> None:
        finished = time.monotonic()
        self._after_failure(exc, len(batch))
        error = self._api_error(exc)
        for job in batch:
            job.finished_at = finished
            job.future.set_exception(error)
