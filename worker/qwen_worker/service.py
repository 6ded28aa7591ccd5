"""The HTTP side's service: prompts and token limits, deadlines, and the engine behind one client."""
from __future__ import annotations

import logging
import time

from .calibration import NONE, Calibration
from .client import EngineClient, RequestHandle, make_client
from .config import WorkerConfig
from .errors import ApiError, engine_error
from .metrics import WorkerMetrics
from .model.loading import model_key
from .prompts import LABELS_ZH, ChatMLPrompter, Message
from .protocol import ModelInfo, RequestFailed, Status
from .sampling import GREEDY, SamplingParams

log = logging.getLogger(__name__)

LEVELS = ((0.8, "high"), (0.6, "medium"), (0.0, "low"))


def sentiment_view(raw: dict[str, float], lang: str, calibration: Calibration = NONE) -> dict:
    """The answer of one text: the label of the highest calibrated score, and the scores both ways."""
    scores = calibration.apply(raw, lang)
    label = max(scores, key=scores.get)
    confidence = scores[label]
    level = next(name for threshold, name in LEVELS if confidence >= threshold)
    return {"label": label, "label_zh": LABELS_ZH[label], "confidence": round(confidence, 6), "level": level,
            "scores": {k: round(v, 6) for k, v in scores.items()},
            "uncalibrated_scores": {k: round(v, 6) for k, v in raw.items()},
            "calibration": calibration.describe(lang)}


class WorkerService:
    """What the blueprints use; the engine is behind `client`, in this process or in an engine process."""

    def __init__(self, config: WorkerConfig, client: EngineClient | None = None, metrics: WorkerMetrics | None = None):
        self.config = config
        self.metrics = metrics or WorkerMetrics()
        self.client = client or make_client(config, self.metrics)

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine (or connect to it); /healthz answers meanwhile and /readyz says 503."""
        self.client.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self.client.wait_loaded(timeout)

    def stop(self) -> None:
        self.client.stop()

    # ---- state ---------------------------------------------------------------------------------
    def status(self) -> Status:
        return self.client.status()

    def model(self, status: Status | None = None) -> ModelInfo:
        """The served model; before the engine said, the configured one."""
        status = status or self.status()
        if status.model is not None:
            return status.model
        cfg = self.config
        return ModelInfo(cfg.model_name, cfg.model, model_key(cfg.model),
                         {"model": cfg.model_name, "source": cfg.model, "configured_model": cfg.model})

    def calibration(self, model: ModelInfo | None = None) -> Calibration:
        """How the served model's sentiment scores are calibrated (as its engine loaded it)."""
        return Calibration.from_dict((model or self.model()).calibration)

    def calibration_view(self, model: ModelInfo | None = None) -> dict:
        return self.calibration(model).describe()

    def readiness(self, status: Status | None = None) -> str:
        """loading | failed | ready | cooling_down | draining (requests still held) | drained (none left)."""
        status = status or self.status()
        return "drained" if status.state == "draining" and status.busy == 0 else status.state

    def set_draining(self, draining: bool) -> Status:
        """Drain: the engine refuses new requests (503 draining, nginx retries them elsewhere) and finishes
        the ones held; /readyz says 503 from now on. Undrain reverses it. Answered once applied."""
        return self._control("drain" if draining else "undrain")

    def control_status(self) -> Status:
        """The engine's state, asked of it now."""
        return self._control("status")

    def _control(self, op: str) -> Status:
        try:
            return self.client.control(op)
        except (RequestFailed, TimeoutError) as exc:
            raise engine_error(exc if isinstance(exc, RequestFailed) else
                               RequestFailed("engine_lost", "the engine did not answer"), self.config.retry_after_s)

    # ---- tasks ---------------------------------------------------------------------------------
    def deadline(self, deadline_ms: int, arrived: float | None = None) -> float:
        """Counted from the request's arrival at the front door (connection.arrival), else from now."""
        return (time.monotonic() if arrived is None else arrived) + deadline_ms / 1000

    def check_deadline(self, deadline: float) -> None:
        """A request already late (it waited in the front door, or in a socket backlog) costs no compute."""
        if time.monotonic() >= deadline:
            self.metrics.rejected("deadline_on_arrival")
            raise engine_error(RequestFailed("deadline_exceeded", "the request's deadline passed before it completed"))

    @property
    def prompter(self) -> ChatMLPrompter:
        """The model's prompt builder; 503 (not_ready, device_error) while the engine takes no requests."""
        status, prompter = self.status(), self.client.prompter
        if status.broken or not status.accepting or prompter is None:
            self.metrics.rejected("not_ready")
            code = "device_error" if status.broken else "not_ready"
            message = "the model's device failed; this instance is restarting, retry on another" if status.broken \
                else "the model is not ready"
            raise engine_error(RequestFailed(code, message), self.config.retry_after_s)
        return prompter

    def decode(self, token_ids) -> str:
        return self.client.prompter.decode(token_ids)

    def check_prompt_tokens(self, prompt_ids: list[int], what: str = "the prompt") -> None:
        """413 for a prompt longer than QAIO_MAX_PROMPT_TOKENS: every task is bounded in tokens before it
        is queued (a character limit is no bound: one character can be several tokens)."""
        limit = self.config.max_prompt_tokens
        if len(prompt_ids) > limit:
            self.metrics.rejected("prompt_too_long")
            raise ApiError(413, "prompt_too_long", f"{what} is {len(prompt_ids)} tokens; at most {limit} are "
                                                   f"accepted (QAIO_MAX_PROMPT_TOKENS)")

    def submit_sentiment(self, text: str, lang: str, deadline: float, task: str = "sentiment") -> RequestHandle:
        """One text's sentiment request (submit_sentiments of one); ApiError when it is refused."""
        job, = self.submit_sentiments([text], [lang], deadline, task)
        if isinstance(job, ApiError):
            raise job
        return job

    def submit_sentiments(self, texts: list[str], langs: list[str], deadline: float,
                          task: str = "sentiment") -> list[RequestHandle | ApiError]:
        """A sentiment request per text (with its lang), tokenized and sent to the engine together: each
        one's handle, or the ApiError that refused it (not ready, a prompt over the token limit, late, a
        full queue), each counted."""
        try:
            prompter = self.prompter
        except ApiError as refused:
            for _ in texts[1:]:
                self.metrics.rejected("not_ready")
            return [refused] * len(texts)
        prompts = prompter.sentiment_ids_many(texts, langs)
        outcomes: list = [None] * len(prompts)
        sendable = []
        for i, ids in enumerate(prompts):
            try:
                self.check_prompt_tokens(ids, "the sentiment prompt of this text")
                self.check_deadline(deadline)
                sendable.append(i)
            except ApiError as refused:
                outcomes[i] = refused
        sent = self.client.sentiments(task, [prompts[i] for i in sendable], deadline)
        for i, outcome in zip(sendable, sent):
            outcomes[i] = engine_error(outcome, self.config.retry_after_s) if isinstance(outcome, RequestFailed) \
                else outcome
        return outcomes

    def submit_generation(self, prompt_ids: list[int], max_tokens: int, deadline: float, task: str,
                          sampling: SamplingParams = GREEDY, stream: bool = False) -> RequestHandle:
        self.check_prompt_tokens(prompt_ids)
        self.check_deadline(deadline)
        return self.client.generate(task, prompt_ids, deadline, max_tokens, sampling, stream)

    def deltas(self, handle: RequestHandle, client_gone=None, stops=None):
        """A streaming generation's text deltas (the engine coalesces them every QAIO_STREAM_COALESCE_MS)."""
        return handle.deltas(self.decode, client_gone, stops)

    def pieces(self, handle: RequestHandle, client_gone=None, stops=None):
        """(text, first token, end token) of a streaming generation, coalesced as deltas are."""
        return handle.pieces(self.decode, client_gone, stops)

    def chat_ids(self, messages: list[Message]) -> list[int]:
        return self.prompter.chat_ids(messages)

    def analyze_ids(self, text, label: str) -> list[int]:
        """text: the text, or the conversation ending with it (a list of Message)."""
        return self.prompter.analyze_ids(text, label)

    def check_analyze_tokens(self, text) -> None:
        """Both prompts of an analyze request within the token limit before either is queued: the reply's
        prompt depends on the label, so each label's is measured."""
        for label in LABELS_ZH:
            self.check_prompt_tokens(self.analyze_ids(text, label), "the reply prompt of this text")
