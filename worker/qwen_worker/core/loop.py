"""The engine loop: one thread that feeds the engine what arrived and reports every pass to a sink.

Each pass: arrived requests become rows in the engine's scheduler (generations, and sentiment texts as
scoring rows; an idle loop given only sentiment requests first waits batch_wait_ms to gather a pass of
them), waiting generations that could no longer finish before their deadline are refused, then one engine
step runs: waiting rows take the free slots of their kind, and both kinds' prompts prefill within its
token budget. What the pass produced (started, streamed tokens, scores, final outputs) goes to `sink` as
one list. The loop knows requests, outputs and error codes; nothing of HTTP.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable

from ..engine import GenerationRow
from ..engine.errors import RowFailed, StepFailed
from ..engine.inference import thread_mode
from ..health import Health
from ..metrics import WorkerMetrics
from ..protocol import GENERATE, SENTIMENT, Request, RequestFailed
from ..model.sentiment import label_scores
from .failures import count_failure
from .admission import ScoringPace, SlotTurnover
from .arrivals import Arrivals, Work
from .outbox import Outbox, Sink

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
        self.outbox = Outbox(sink, config.stream_coalesce_ms / 1000)
        self._final = self.outbox.final
        self.turnover = SlotTurnover(config.max_batch_size)
        self.pace = ScoringPace()
        self.arrivals = Arrivals(config.queue_capacity, metrics, lambda: self.engine.scheduler,
                                 turnover=self.turnover if config.admit_by_estimate else None,
                                 pace=self.pace if config.admit_by_estimate else None)
        self._held: dict[int, Work] = {}  # requests in the engine (waiting for a slot or in one), by id
        self._generating: dict[int, Work] = {}  # generations holding a slot, by id (engine thread only)
        self._started_scoring: list[Work] = []  # sentiment requests that took a slot this pass
        self._thread: threading.Thread | None = None
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
        self.arrivals.put(Work(request, row=GenerationRow.scoring(request.prompt, deadline=request.deadline)
                               if request.kind == SENTIMENT else
                               GenerationRow(request.prompt, request.max_tokens, request.sampling, deadline=request.deadline)))

    def _refusal(self) -> str | None:
        if self.health.broken or self.device_error is not None:
            return "device_error"
        if self.health.draining:
            return "draining"
        return None if self.health.accepting() and not self.arrivals.stopping else "not_ready"

    def cancel(self, request_id: int, reason: str = "client_gone") -> None:
        """A request not yet in a slot leaves (counted as `reason`) and one in a slot stops, at the next step."""
        with self.arrivals.cond:  # a request the engine thread takes is in _held from then on
            if self.arrivals.remove(request_id) is not None:
                self.metrics.rejected(reason)
                return
            work = self._held.get(request_id)
        if work is not None:
            work.cancel_reason = reason
            work.row.cancelled.set()

    def waiting(self) -> int:
        """Requests without a slot (the queue depth)."""
        return self.arrivals.waiting() if self.engine is not None else len(self.arrivals)

    def busy(self) -> int:
        """Requests held: arrived, waiting, scoring or generating (what a drain waits for)."""
        return len(self.arrivals) + len(self._held)

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
        self.arrivals.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        with thread_mode():  # once, not per step (engine/inference.py)
            self._serve()

    def _serve(self) -> None:
        engine = self.engine
        engine.after_prefill = self._send_prefilled
        try:
            while self.device_error is None:
                arrived = self.arrivals.next(self.config.batch_wait_ms / 1000, self._hold)
                if arrived is None:
                    return
                for work in arrived:
                    self._add(work)
                for row, refusal in self.arrivals.unreachable(time.monotonic()):
                    engine.withdraw(row, refusal)
                if engine.has_work() and self.device_error is None:
                    self._step()
                self._scored_together()
                self.metrics.observe_pass(engine.live(), engine.runner.slots, engine.kv_stats())
                self.arrivals.publish_depth()
                self.outbox.flush(self._generating.values())
        finally:
            code = "device_error" if self.device_error is not None else "not_ready"
            why = REFUSALS["device_error"] if self.device_error is not None else "the worker is stopping"
            engine.fail_all(RequestFailed(code, why))
            self._answer_failed()
            with self.arrivals.cond:
                arrived = self.arrivals.take()
            for work in arrived:  # nothing more will run
                self._final(work, error=RequestFailed(code, why))
            self.outbox.flush(self._generating.values())
        if self.device_error is not None:
            self.on_device_error()

    def _send_prefilled(self) -> None:
        """Mid-step, before the decode pass: the first tokens and scores the prefill produced go out now."""
        self._scored_together()
        self.outbox.flush(self._generating.values())

    def _hold(self, arrived: list[Work]) -> None:
        """Taken by the engine thread: from now on a cancel finds them here (called under arrivals.cond)."""
        self._held.update((work.id, work) for work in arrived)

    def _add(self, work: Work) -> None:
        """The request's row into the engine, where it waits for a slot; a row the engine's tables cannot
        hold fails alone."""
        on_start, on_done = (self._scoring_started, self._scoring_done) if work.row.score else \
            (self._generation_started, self._generation_done)
        try:
            self.engine.add(work.row, lambda row, error, work=work: on_done(work, error),
                            lambda row, work=work: on_start(work))
        except RowFailed as refused:
            self._held.pop(work.id, None)
            self._refuse(work, refused)
        except Exception as exc:
            self._held.pop(work.id, None)
            self._fail([work], exc)

    def _generation_started(self, work: Work) -> None:
        self._generating[work.id] = work
        work.started_at = time.monotonic()
        work.batch_size = self.engine.live()  # the rows generating together as this one joins
        self.metrics.batch_size.labels(kind=GENERATE).observe(work.batch_size)
        self.outbox.started(work)

    def _scoring_started(self, work: Work) -> None:
        work.started_at = time.monotonic()
        self._started_scoring.append(work)

    def _scored_together(self) -> None:
        """The sentiment requests that took a slot in this pass started as one batch."""
        started, self._started_scoring = self._started_scoring, []
        for work in started:
            work.batch_size = len(started)
        if started:
            self.metrics.batch_size.labels(kind=SENTIMENT).observe(len(started))

    def _left_waiting(self, work: Work, error: Exception | None) -> None:
        """A request that left before it held a slot: refused, its deadline passed, or its client left."""
        row = work.row
        if isinstance(error, RequestFailed):  # refused by the estimate
            self._final(work, error=error)
        elif error is not None:
            self._failed.append((work, error))  # answered by _answer_failed, after the failure is counted
        elif row.finish_reason == "deadline":
            self.metrics.rejected("deadline_in_queue")
            self._final(work, error=RequestFailed("deadline_exceeded", "the request's deadline passed in the queue"))
        else:  # cancelled: nobody waits for an answer
            self.metrics.rejected(work.cancel_reason)

    def _step(self) -> None:
        scored, started = self.engine.scoring_tokens, time.monotonic()
        try:
            self.engine.step()
        except StepFailed as failure:  # its rows came back through _generation_done
            self._after_failure(failure.cause, len(failure.rows))
        finally:
            self._answer_failed()
        if self.config.step_delay_ms:
            time.sleep(self.config.step_delay_ms / 1000)
        self.pace.observe(self.engine.scoring_tokens - scored, time.monotonic() - started)

    def _generation_done(self, work: Work, error: Exception | None) -> None:
        self._held.pop(work.id, None)
        self._generating.pop(work.id, None)
        if work.started_at is None:
            return self._left_waiting(work, error)
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

    def _scoring_done(self, work: Work, error: Exception | None) -> None:
        self._held.pop(work.id, None)
        self._scored_together()  # every row that took a slot this step did so before any ended
        if work.started_at is None:
            return self._left_waiting(work, error)
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
