"""An API process's side of the engine process (engine_server): the batcher's interface over a socket,
and mirrors of the engine's health and model, so that the HTTP layer cannot tell the two apart."""
from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Client, Connection

import torch

from .batcher import GENERATE, Job, check_accepting
from .devices import cuda_expected
from .engine_process import AUTHKEY_ENV, ENGINE_PID_ENV, MASTER_PID_ENV, SOCKET_ENV
from .errors import ApiError
from .metrics import WorkerMetrics
from .model import ServedModel, model_key
from .prompts import ChatMLPrompter

log = logging.getLogger(__name__)

CONNECT_RETRY_S = 0.2


class RemoteHealth:
    """The engine's readiness as its last status said, and whether this process can build prompts yet."""

    def __init__(self):
        self.status: dict = {"accepting": False, "ready": False, "reason": "loading", "load_error": None,
                             "queue_depth": 0}
        self.prompts_ready = False
        self.lost: str | None = None

    @property
    def load_error(self) -> str | None:
        return self.lost or self.status.get("load_error")

    @property
    def broken(self) -> str | None:
        """Why this instance cannot recover by itself: its engine is gone, or hit a sticky device error."""
        return self.lost or self.status.get("broken")

    @property
    def draining(self) -> bool:
        return bool(self.status.get("draining"))

    def accepting(self) -> bool:
        return self.lost is None and self.prompts_ready and self.status["accepting"]

    def ready(self) -> bool:
        return self.accepting() and self.status["ready"]

    def reason(self) -> str:
        if self.lost is not None:
            return "failed"
        if self.status["accepting"] and not self.prompts_ready:
            return "loading"
        return self.status["reason"]


class ModelView(ServedModel):
    """The engine's model as an API process needs it: its tokenizer (prompts are built and replies
    decoded here, off the engine's GIL) and its description."""

    def __init__(self, config):
        self.config = config
        index = config.device.partition(":")[2] or "0"
        self.device = torch.device(f"cuda:{index}") if cuda_expected(config.device) else torch.device("cpu")
        self.tokenizer = None
        self.prompter: ChatMLPrompter | None = None
        self.info: dict = {}
        self.name = config.model_name
        self.served_source = config.model
        self.identity = model_key(config.model)
        self.demo_info = self.stand_in_info = self.fallback_reason = None

    def load(self, info: dict) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(info["source"])
        self.prompter = ChatMLPrompter(self.tokenizer)
        self.info = info
        self.name, self.served_source, self.identity = info["name"], info["source"], info["identity"]
        self.demo_info, self.stand_in_info = info["demo_info"], info["stand_in_info"]
        self.fallback_reason = info["fallback_reason"]

    def describe(self) -> dict:
        return dict(self.info.get("describe") or {"model": self.name, "source": self.served_source,
                                                  "configured_model": self.config.model})

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class RemoteEngine:
    """Submits jobs to the engine process and completes them from its answers (Batcher's interface)."""

    def __init__(self, config, metrics: WorkerMetrics, address: str, authkey: bytes):
        self.config = config
        self.metrics = metrics
        self.address = address
        self.authkey = authkey
        self.model = ModelView(config)
        self.health = RemoteHealth()
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._stopping = False

    @classmethod
    def from_env(cls, config, metrics: WorkerMetrics) -> "RemoteEngine | None":
        """The engine process gunicorn.conf.py started for this instance, if it started one."""
        address = os.environ.get(SOCKET_ENV)
        if not address:
            return None
        return cls(config, metrics, address, bytes.fromhex(os.environ[AUTHKEY_ENV]))

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._run, name="engine-client", daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        while self._conn is None and not self._stopping:
            try:
                self._conn = Client(self.address, family="AF_UNIX", authkey=self.authkey)
            except (FileNotFoundError, ConnectionRefusedError):
                if not _engine_alive():
                    self._lost("the engine process exited before it listened")
                    return
                time.sleep(CONNECT_RETRY_S)
        try:
            while True:
                for message in self._conn.recv():
                    self._handle(message)
        except (EOFError, OSError):
            pass
        if not self._stopping:
            self._lost("the engine process exited")

    def _lost(self, why: str) -> None:
        """Without its engine this instance can serve nothing: fail what waits, and stop the instance so
        that its supervisor (compose, Kubernetes) starts a whole new one."""
        log.critical("%s; stopping this instance", why)
        self.health.lost = why
        self.metrics.ready.set(0)
        error = ApiError(503, "engine_lost", "the model process of this instance stopped",
                         retry_after=self.config.retry_after_s)
        for job in list(self._jobs.values()):
            job.future.set_exception(error)
        self._jobs.clear()
        master = os.environ.get(MASTER_PID_ENV)
        if master:
            os.kill(int(master), signal.SIGTERM)

    # ---- messages from the engine -------------------------------------------------------------
    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "tokens":
            for job_id, tokens in message[1]:
                job = self._jobs.get(job_id)
                if job is not None and job.payload.on_token is not None:
                    for token in tokens:
                        job.payload.on_token(token)
        elif kind == "done":
            self._done(*message[1:])
        elif kind == "status":
            self._status(message[1])

    def _done(self, job_id: int, result, error, timing) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:  # it gave up meanwhile
            return
        job.enqueued_at, job.started_at, job.finished_at, job.batch_size = timing
        if error is not None:
            job.future.set_exception(ApiError(*error))
        elif job.kind == GENERATE:
            job.payload.tokens, job.payload.finish_reason = result
            job.future.set_result(job.payload)
        else:
            job.future.set_result(result)

    def _status(self, status: dict) -> None:
        model = status.get("model")
        if model is not None and not self.health.prompts_ready:
            try:
                self.model.load(model)
                self.health.prompts_ready = True
            except Exception as exc:
                log.exception("could not load the tokenizer of %s", model["source"])
                self.health.lost = f"tokenizer of {model['source']}: {type(exc).__name__}: {exc}"
        self.health.status = status
        self.metrics.ready.set(1 if self.health.ready() else 0)
        self.metrics.draining.set(1 if self.health.draining else 0)

    # ---- the batcher's interface --------------------------------------------------------------
    def check_accepting(self) -> None:
        # Draining is the engine's to decide: a mirror up to a status interval old would refuse
        # requests after an undrain.
        check_accepting(self.health, self.metrics, self.config.retry_after_s, drain=False)

    def submit(self, job: Job) -> Job:
        self.check_accepting()
        job_id = next(self._ids)
        # Giving up here (deadline, client gone) always ends the wait; the engine drops or stops the job.
        job.withdraw = lambda job, reason=None, job_id=job_id: self._give_up(job_id)
        if job.kind == GENERATE:
            row = job.payload
            payload = (row.prompt_ids, row.max_new_tokens, row.temperature, row.top_p)
            stream = row.on_token is not None
        else:
            payload, stream = job.payload, False
        self._jobs[job_id] = job
        try:
            self._send(("submit", job_id, job.kind, job.task, payload, job.deadline, stream))
        except ApiError:
            self._jobs.pop(job_id, None)
            raise
        return job

    def _give_up(self, job_id: int) -> bool:
        """Its deadline passed or its client left: the engine drops or stops it; this process answers now."""
        if self._jobs.pop(job_id, None) is not None:
            self._send(("cancel", job_id))
        return True

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send([message])
        except (OSError, AttributeError, ValueError):
            raise ApiError(503, "engine_lost", "the model process of this instance is not reachable",
                           retry_after=self.config.retry_after_s) from None

    def depth(self) -> int:
        return self.health.status.get("queue_depth", 0)

    def busy(self) -> int:
        return self.health.status.get("busy", 0)

    def set_draining(self, draining: bool, timeout: float = 5.0) -> None:
        """Set the engine's state, for every API process; returns once the engine's answering status
        reached this one (the others see it within a status interval, and meanwhile the engine itself
        refuses their submissions while draining)."""
        self._send(("drain", draining))
        deadline = time.monotonic() + timeout
        while self.health.draining != draining and time.monotonic() < deadline:
            time.sleep(0.005)

    def engine_heap(self) -> dict[int, dict[str, int]]:
        """The engine process's C heap as its last status said (for qaio_heap_bytes)."""
        status = self.health.status
        return {status["pid"]: status["heap"]} if status.get("heap") else {}


def _engine_alive() -> bool:
    pid = os.environ.get(ENGINE_PID_ENV)
    if not pid:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
