"""The engine loop: one thread that feeds the engine from the queue and reports every pass to a sink.

Each pass: queued generations join the running batch while batch slots are free, queued sentiment
requests become scoring rows while scoring slots are free (within a step's prompt tokens: urgent ones
first, then the shortest; an idle loop first waits batch_wait_ms to gather them), then one engine step
runs, which prefills both kinds' prompts within its token budget. What the pass produced (started,
streamed tokens, scores, final outputs) goes to `sink` as one list. The loop knows requests, outputs and
error codes; nothing of HTTP.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable

from ..engine import GenerationRow
from ..engine.engine import RowFailed, StepFailed
from ..health import Health
from ..metrics import WorkerMetrics
from ..protocol import GENERATE, SENTIMENT, Output, Request, RequestFailed
from ..model.sentiment import label_scores
from .failures import count_failure, failure_code
from .admission import SlotTurnover
from .queue import RequestQueue, Work

Sink = Callable[[list[Output]], None]
# The loop gives up the GIL at every device call; with hundreds of HTTP threads runnable, Python's
# default 5 ms switch interval would let each of those hand-backs cost up to 5 ms.
SWITCH_INTERVAL_S = 0.0005
REFUSALS = {"device_error": "the model's device failed; this instance is restarting, retry on another",
            "draining": "this instance is draining and takes no new requests; retry on another",
            "not_ready": "the model is not ready"}


class EngineLoop:
    def __init__(self, model, config, metrics: WorkerMetrics, health: Health, sink: Sink):
        self.model = model  # a loaded ModelService: its engine generates, it scores sentiment
        self.config = config
        self.metrics = metrics
        self.health = health
        self.sink = sink
        self.turnover = SlotTurnover(config.max_batch_size)
        self.queue = RequestQueue(config.queue_capacity, metrics,
                                  free_slots=lambda: max(0, config.max_batch_size - len(self._running)),
                                  turnover=self.turnover if config.admit_by_estimate else None)
        self._running: dict[int, Work] = {}  # generations holding a slot, by request id
        self._outbox: list[Output] = []  # what this pass produced (engine thread only)
        self._scoring: dict[int, Work] = {}  # sentiment requests holding a scoring slot, by request id
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.device_error: Exception | None = None  # a sticky device error: the loop stopped on it
        self._failed: list[tuple[Work, Exception]] = []  # answered once the failure is counted
        self.on_device_error: Callable[[], None] = lambda: None  # after the loop ended on one

    @property
    def engine(self):
        return self.model.engine

    # ---- any thread ---------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; RequestFailed (counted) when the engine cannot take it now."""
        refusal = self._refusal()
        if refusal is not None:
            self.metrics.rejected("not_ready" if refusal == "device_error" else refusal)
            raise RequestFailed(refusal, REFUSALS[refusal])
        work = Work(request)
        if request.kind == SENTIMENT:  # what its prefill computes: the instruction prefix is cached
            work.pass_tokens = len(request.prompt) - self.engine.scheduler.blocks.cached_tokens(request.prompt)
        self.queue.put(work)

    def _refusal(self) -> str | None:
        if self.health.broken or self.device_error is not None:
            return "device_error"
        if self.health.draining:
            return "draining"
        return None if self.health.accepting() and not self._stopping else "not_ready"

    def cancel(self, request_id: int, reason: str = "client_gone") -> None:
        """A queued request leaves the queue (counted as `reason`); a generating one stops at the next step."""
        if self.queue.remove(request_id) is not None:
            self.metrics.rejected(reason)
            return
        work = self._running.get(request_id) or self._scoring.get(request_id)
        if work is not None and work.row is not None:
            work.row.cancelled.set()

    def busy(self) -> int:
        """Requests held: queued, scoring or generating (what a drain waits for)."""
        return len(self.queue) + len(self._scoring) + len(self._running)

    def start(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def run_here(self) -> None:
        """Serve on the calling thread until stopped: the thread that loaded and warmed the model, so
        per-thread state it built (cuDNN execution plans, CUDA graph pools) is what serving uses."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.current_thread()
        self._thread.name = "engine"
        self._run()

    def stop(self) -> None:
        with self.queue.cond:
            self._stopping = True
            self.queue.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while self.device_error is None:
                work = self._next_work()
                if work is None:
                    return
                generation, sentiment = work
                for item in generation:
                    self._start_generation(item)
                if sentiment:
                    self._start_scoring(sentiment)
                if engine.has_work() and self.device_error is None:
                    self._step()
                live = engine.live()
                self.metrics.live_slots.set(live)
                self.metrics.slot_utilization.set(live / max(engine.runner.slots, 1))
                self.metrics.observe_kv(engine.kv_stats())
                self._flush()
        finally:
            code = "device_error" if self.device_error is not None else "not_ready"
            why = REFUSALS["device_error"] if self.device_error is not None else "the worker is stopping"
            engine.fail_all(RequestFailed(code, why))
            self._answer_failed()
            for item in self.queue.drain_all():  # nothing queued will ever run
                self._final(item, error=RequestFailed(code, why))
            self._flush()
        if self.device_error is not None:
            self.on_device_error()

    def _next_work(self) -> tuple[list[Work], list[Work]] | None:
        """Generations for the free slots and sentiment requests for the free scoring slots; None when
        stopping. Requests with long texts hold at most half the scoring slots: the rest stay free for
        short ones, which the scheduler prefills first."""
        engine, queue, cfg = self.engine, self.queue, self.config
        with queue.cond:
            while not self._stopping and not len(queue) and not engine.has_work():
                queue.cond.wait()
            if self._stopping:
                return None
            generation: list[Work] = []
            queue.take(GENERATE, generation, engine.free_slots())
            unreachable = queue.unreachable(time.monotonic(), engine.free_slots() - len(generation))
            sentiment: list[Work] = []
            if queue.has(SENTIMENT) and engine.free_score_slots():
                # Idle: worth waiting a little to fill the pass. Busy: the decode steps must go on.
                gather_until = time.monotonic() + cfg.batch_wait_ms / 1000
                budget, slots, short = cfg.prefill_chunk_tokens, engine.free_score_slots(), engine.scheduler.short_tokens
                long_room = max(engine.runner.score_slots // 2, 1) - sum(
                    1 for work in self._scoring.values() if work.pass_tokens > short)
                while True:
                    tokens = queue.take_within(SENTIMENT, sentiment, slots, budget, time.monotonic(),
                                               long_tokens=short, long_room=long_room)
                    remaining = gather_until - time.monotonic()
                    full = len(sentiment) >= slots or tokens >= budget
                    if engine.has_work() or generation or full or remaining <= 0 or self._stopping:
                        break
                    queue.cond.wait(remaining)
        for work, refusal in unreachable:
            self._final(work, error=refusal)
        return self._drop_expired(generation), self._drop_expired(sentiment)

    def _drop_expired(self, batch: list[Work]) -> list[Work]:
        now = time.monotonic()
        live = []
        for work in batch:
            if now >= work.request.deadline:
                self.metrics.rejected("deadline_in_queue")
                self._final(work, error=RequestFailed("deadline_exceeded", "the request's deadline passed in the queue"))
            else:
                live.append(work)
        return live

    def _start_generation(self, work: Work) -> None:
        r = work.request
        work.started_at = time.monotonic()
        work.row = GenerationRow(r.prompt, r.max_tokens, r.sampling, deadline=r.deadline)
        try:
            self.engine.add(work.row, lambda row, error, work=work: self._generation_done(work, error))
        except RowFailed as refused:  # a row the engine's tables cannot hold fails alone
            self._refuse(work, refused)
            return
        except Exception as exc:
            self._fail([work], exc)
            return
        self._running[work.id] = work
        work.batch_size = self.engine.live()  # the rows generating together as this one joins
        self.metrics.batch_size.labels(kind=GENERATE).observe(work.batch_size)
        self._outbox.append(Output(work.id, started_at=work.started_at, batch_size=work.batch_size))

    def _step(self) -> None:
        try:
            self.engine.step()
        except StepFailed as failure:  # its rows came back through _generation_done
            self._after_failure(failure.cause, len(failure.rows))
        finally:
            self._answer_failed()

    def _generation_done(self, work: Work, error: Exception | None) -> None:
        self._running.pop(work.id, None)
        self.turnover.observe(time.monotonic() - work.started_at, len(work.row.tokens))
        if error is not None:
            self._failed.append((work, error))  # answered by _answer_failed, after the failure is counted
            return
        self.health.record_success()
        row = work.row
        finished = time.monotonic()
        self.metrics.observe_done(work.request.task, work.started_at - work.enqueued_at, finished - work.started_at,
                                  len(row.prompt_ids), len(row.tokens))
        self._final(work, finish_reason=row.finish_reason, finished_at=finished)

    def _answer_failed(self) -> None:
        failed, self._failed = self._failed, []
        for work, error in failed:
            self._final(work, error=error)

    def _refuse(self, work: Work, refused: RowFailed) -> None:
        self.metrics.rejected(refused.code)
        self._final(work, error=refused)

    def _start_scoring(self, batch: list[Work]) -> None:
        """Each request a scoring row in a scoring slot; a text the engine's tables cannot hold fails alone."""
        started = time.monotonic()
        admitted = []
        for work in batch:
            work.started_at = started
            work.row = GenerationRow.scoring(work.request.prompt, deadline=work.request.deadline)
            try:
                self.engine.add(work.row, lambda row, error, work=work: self._scoring_done(work, error))
            except RowFailed as refused:
                self._refuse(work, refused)
                continue
            self._scoring[work.id] = work
            admitted.append(work)
        for work in admitted:
            work.batch_size = len(admitted)
        if admitted:
            self.metrics.batch_size.labels(kind=SENTIMENT).observe(len(admitted))

    def _scoring_done(self, work: Work, error: Exception | None) -> None:
        self._scoring.pop(work.id, None)
        row = work.row
        if error is not None:
            self._failed.append((work, error))  # answered by _answer_failed, after the failure is counted
        elif row.finish_reason == "scored":
            self.health.record_success()
            finished = time.monotonic()
            self.metrics.observe_done(work.request.task, work.started_at - work.enqueued_at, finished - work.started_at,
                                      len(row.prompt_ids))
            self._final(work, scores=label_scores(row.label_probs), finished_at=finished)
        elif row.finish_reason == "deadline":
            self._final(work, error=RequestFailed("deadline_exceeded", "the request's deadline passed before it was scored"))
        else:  # cancelled: its client left
            self._final(work, error=RequestFailed("client_closed_request", "the client left before it was scored"))

    def _fail(self, batch: list[Work], exc: Exception) -> None:
        self._after_failure(exc, len(batch))
        for work in batch:
            self._final(work, error=exc)

    def _after_failure(self, exc: Exception, size: int) -> None:
        if count_failure(exc, size, self.metrics, self.health, self.model.device):
            self.device_error = exc  # the loop ends: what it holds is answered as it does

    def _final(self, work: Work, error: Exception | None = None, **fields) -> None:
        """The request's last output, with every generated token not sent yet."""
        output = Output(work.id, started_at=work.started_at, batch_size=work.batch_size, **fields)
        if work.row is not None:
            output.tokens = work.row.tokens[work.sent:]
            output.cached_tokens = work.row.cached_prompt_tokens
            output.first_token_at = work.first_token_at or (output.finished_at if work.row.tokens else None)
            if work.row.sampling.logprobs >= 0:
                output.logprobs = work.row.token_logprobs[work.sent:]
        if error is not None:
            output.error, output.message = (error.code, error.message) if isinstance(error, RequestFailed) \
                else failure_code(error)
            output.finished_at = output.finished_at or time.monotonic()
        self._outbox.append(output)

    def _flush(self) -> None:
        """Send what this pass produced: streamed tokens of running generations, then the rest."""
        now = time.monotonic()
        for work in self._running.values():
            if work.first_token_at is None and work.row.tokens:
                work.first_token_at = now
            if work.request.stream and len(work.row.tokens) > work.sent:
                self._outbox.append(Output(work.id, tokens=work.row.tokens[work.sent:],
                                           logprobs=work.row.token_logprobs[work.sent:] if work.row.sampling.logprobs >= 0
                                           else None, first_token_at=work.first_token_at))
                work.sent = len(work.row.tokens)
        if self._outbox:
            outputs, self._outbox = self._outbox, []
            self.sink(outputs)
