"""The worker's one service object: model, batcher, health and metrics, and the tasks built on them."""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Iterator

from .batcher import GENERATE, SENTIMENT, Batcher, Job, deadline_error
from .config import WorkerConfig
from .errors import ApiError
from .engine import GenerationRow
from .health import Health
from .memory import HeapTrimmer
from .metrics import WorkerMetrics
from .model import ModelService
from .prompts import LABELS_ZH, Message

log = logging.getLogger(__name__)

LEVELS = ((0.8, "high"), (0.6, "medium"), (0.0, "low"))


def sentiment_view(scores: dict[str, float]) -> dict:
    label = max(scores, key=scores.get)
    confidence = scores[label]
    level = next(name for threshold, name in LEVELS if confidence >= threshold)
    return {"label": label, "label_zh": LABELS_ZH[label], "confidence": round(confidence, 6), "level": level,
            "scores": {k: round(v, 6) for k, v in scores.items()}}


class WorkerService:
    """In-process (the default on a CPU): model and batcher live here. In an API process beside an engine
    process (gunicorn.conf.py started one: the default on a GPU): the batcher, model and health are its mirrors of that one."""

    def __init__(self, config: WorkerConfig, model: ModelService | None = None, use_engine_process: bool = False):
        self.config = config
        self.metrics = WorkerMetrics()
        self._loaded = threading.Event()
        self.remote = None
        if use_engine_process:
            from .engine_client import RemoteEngine

            self.remote = RemoteEngine.from_env(config, self.metrics)
        if self.remote is not None:
            self.model, self.health, self.batcher = self.remote.model, self.remote.health, self.remote
            self._loaded.set()
            return
        self.model = model or ModelService(config)
        self.health = Health(config.failure_threshold, config.failure_cooldown_s)
        self.batcher = Batcher(self.model, config, self.metrics, self.health)
        self.batcher.on_device_error = self._after_device_error
        # How this process ends itself after a sticky device error: gunicorn's worker stops gracefully on
        # SIGTERM and its master forks a fresh one; the engine process exits (engine_server sets it).
        self.exit_process = lambda: os.kill(os.getpid(), signal.SIGTERM)

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model in the background; /healthz answers meanwhile and /readyz says 503."""
        if self.remote is not None:
            self.remote.start()
            return
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            self.model.load()
            engine = self.model.engine
            engine.observe_step = self.metrics.observe_step
            self.metrics.slots.set(engine.runner.slots)
            self.metrics.cuda_graphs.set(len(engine.runner.graphs))
            if self.config.warmup:
                self.model.warmup()
            info = self.model.describe()
            self.metrics.set_model_info(info, self.config.instance_id)
            self.batcher.start()
            HeapTrimmer(self.config.heap_trim_s).start()
            self.health.mark_ready()
            self.metrics.ready.set(1)
            log.info("model ready", extra={**info, "parameters": self.model.parameter_count,
                                           "load_seconds": round(self.model.load_seconds, 2)})
            if self.model.is_demo:
                log.warning("DEMO MODEL: %s serves RANDOM WEIGHTS; its answers are meaningless",
                            self.model.served_source, extra={"demo_model": self.model.demo_info})
            elif self.model.is_stand_in:
                info = self.model.stand_in_info
                log.warning("STAND-IN MODEL: serving %s from %s, NOT %s (%s)", info["name"],
                            self.model.served_source, info["stands_in_for"], info["note"],
                            extra={"stand_in_model": info})
        except Exception as exc:
            log.exception("model load failed")
            self.health.mark_failed(f"{type(exc).__name__}: {exc}")
        finally:
            self._loaded.set()

    def _after_device_error(self) -> None:
        """The engine stopped on a sticky device error and has answered what it held: end this process
        after QAIO_DEVICE_ERROR_EXIT_S, so that its supervisor starts one with a fresh device context."""
        delay = self.config.device_error_exit_s
        if delay > 0:
            log.critical("exiting in %.1f s after a sticky device error", delay)
            timer = threading.Timer(delay, self.exit_process)
            timer.daemon = True
            timer.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def stop(self) -> None:
        self.batcher.stop()

    # ---- operations ----------------------------------------------------------------------------
    def set_draining(self, draining: bool) -> None:
        """Drain: refuse new requests (503 draining, nginx retries them elsewhere) and finish the ones
        held; /readyz says 503 from now on. Undrain reverses it."""
        if self.remote is not None:
            self.remote.set_draining(draining)
            return
        self.health.set_draining(draining)
        self.metrics.draining.set(1 if draining else 0)
        if self.health.state == "ready":
            self.metrics.ready.set(1 if self.health.ready() else 0)

    def readiness(self) -> str:
        """loading | failed | ready | cooling_down | draining (requests still held) | drained (none left)."""
        reason = self.health.reason()
        if reason == "draining" and self.batcher.busy() == 0:
            return "drained"
        return reason

    # ---- tasks ---------------------------------------------------------------------------------
    def deadline(self, deadline_ms: int, arrived: float | None = None) -> float:
        """Counted from the request's arrival at the front door (connection.arrival), else from now."""
        return (time.monotonic() if arrived is None else arrived) + deadline_ms / 1000

    def check_deadline(self, deadline: float) -> None:
        """A request already late (it waited in the front door, or in a socket backlog) costs no compute."""
        if time.monotonic() >= deadline:
            self.metrics.rejected("deadline_on_arrival")
            raise deadline_error()

    @property
    def prompter(self):
        """The model's prompt builder; 503 not_ready until the model is loaded."""
        self.batcher.check_accepting()
        return self.model.prompter

    def check_prompt_tokens(self, prompt_ids: list[int], what: str = "the prompt") -> None:
        """413 for a prompt longer than QAIO_MAX_PROMPT_TOKENS: every task is bounded in tokens before it
        is queued (a character limit is no bound: one character can be several tokens)."""
        limit = self.config.max_prompt_tokens
        if len(prompt_ids) > limit:
            self.metrics.rejected("prompt_too_long")
            raise ApiError(413, "prompt_too_long", f"{what} is {len(prompt_ids)} tokens; at most {limit} are "
                                                   f"accepted (QAIO_MAX_PROMPT_TOKENS)")

    def submit_sentiment(self, text: str, lang: str, deadline: float, task: str = "sentiment") -> Job:
        ids = self.prompter.sentiment_ids(text, lang)
        self.check_prompt_tokens(ids, "the sentiment prompt of this text")
        self.check_deadline(deadline)
        return self.batcher.submit(Job(SENTIMENT, task, ids, deadline))

    def submit_generation(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
                          deadline: float, task: str, stream: "TokenStream | None" = None) -> Job:
        self.check_prompt_tokens(prompt_ids)
        self.check_deadline(deadline)
        row = GenerationRow(prompt_ids, max_tokens, temperature, top_p, deadline,
                            on_token=stream.put_token if stream else None)
        job = self.batcher.submit(Job(GENERATE, task, row, deadline))
        if stream is not None:
            stream.attach(job)
        return job

    def token_stream(self, client_gone=None) -> "TokenStream":
        return TokenStream(self.model.decode, self.config.stream_coalesce_ms / 1000, client_gone)

    def chat_ids(self, messages: list[Message]) -> list[int]:
        return self.prompter.chat_ids(messages)

    def analyze_ids(self, text: str, label: str) -> list[int]:
        return self.prompter.analyze_ids(text, label)

    def check_analyze_tokens(self, text: str) -> None:
        """Both prompts of an analyze request within the token limit before either is queued: the reply's
        prompt depends on the label, so each label's is measured."""
        for label in LABELS_ZH:
            self.check_prompt_tokens(self.analyze_ids(text, label), "the reply prompt of this text")


class TokenStream:
    """Text deltas of one streaming generation, fed token by token from the engine thread.

    The first token goes out at once; later ones are sent at most every `coalesce_s` seconds, as one
    delta of all tokens that arrived meanwhile: at thousands of tokens per second, an event (a thread
    wake-up and a socket write) per token would cost the HTTP layer more than the model.
    """

    _DONE = object()

    def __init__(self, decode, coalesce_s: float = 0.0, client_gone=None):
        self.decode = decode
        self.coalesce_s = coalesce_s
        self.client_gone = client_gone  # checked while no token comes (a queued stream writes nothing)
        self._events: queue.Queue = queue.Queue()
        self.job: Job | None = None
        self.tokens: list[int] = []
        self._pending_from = 0  # tokens before this index are already sent as text

    def put_token(self, token: int) -> None:
        self._events.put(token)

    def attach(self, job: Job) -> None:
        self.job = job
        job.future.add_done_callback(lambda _: self._events.put(self._DONE))

    def _next_events(self, send_after: float) -> list:
        """The next event, then (once the coalescing window has passed) every event queued by then."""
        events = [self.job.wait_for(lambda timeout: self._events.get(timeout=timeout), queue.Empty, self.client_gone)]
        if self.coalesce_s and events[0] is not self._DONE:
            delay = send_after - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            while True:
                try:
                    events.append(self._events.get_nowait())
                except queue.Empty:
                    break
        return events

    def deltas(self) -> Iterator[str]:
        """Yields text as it is generated; ends when the job ends (its outcome is in `job.future`)."""
        job = self.job
        send_after = 0.0
        try:
            while True:
                events = self._next_events(send_after)
                done = any(event is self._DONE for event in events)
                self.tokens.extend(event for event in events if event is not self._DONE)
                delta = self._delta(final=done)
                if delta:
                    yield delta
                    send_after = time.monotonic() + self.coalesce_s
                if done:
                    return
        except GeneratorExit:
            job.cancel()  # the client went away: stop generating for it
            raise

    def _delta(self, final: bool) -> str:
        # Byte-level BPE decodes token by token without context, so only the tokens not yet sent need
        # decoding; they wait while they end inside a multi-byte character.
        text = self.decode(self.tokens[self._pending_from:])
        if not final and text.endswith("\ufffd"):
            return ""
        self._pending_from = len(self.tokens)
        return text
