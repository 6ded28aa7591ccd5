"""The engine process: one per device, it owns the model, its KV slots and the batcher; the API
processes (gunicorn's workers) send it jobs over a Unix socket and get tokens and results back.

Why a process of its own: in one process, hundreds of HTTP threads (gunicorn's parser, Flask, JSON,
SSE writes) share one GIL with the engine thread, and the GPU waits on Python. Here the engine's
process runs only the engine thread and one reader and one sender thread per API process.

Protocol (multiprocessing.connection, pickled lists of tuples, so one send carries many messages):
    API -> engine   ("submit", id, kind, task, payload, deadline, stream)   ("cancel", id)
    engine -> API   ("tokens", [(id, [token, ...]), ...])   ("done", id, result, error, timing)
                    ("status", {...})  on connect, then every STATUS_INTERVAL_S
Deadlines are time.monotonic() values: one clock for every process on the host.

    python -m qwen_worker.engine_server   (gunicorn.conf.py starts it; QAIO_ENGINE_SOCKET names the socket)
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from typing import Callable

from . import memory
from .batcher import GENERATE, SENTIMENT, Job
from .config import WorkerConfig
from .engine import GenerationRow
from .engine_process import AUTHKEY_ENV, SOCKET_ENV
from .errors import ApiError
from .service import WorkerService

log = logging.getLogger("qwen_worker.engine_server")  # also when run as __main__

STATUS_INTERVAL_S = 0.25
# Reading the C heap (mallinfo2) takes ~8 ms with the 0.5B model loaded, holding malloc's arena locks
# that the engine thread allocates under: read it this seldom, not with every status.
HEAP_INTERVAL_S = 5.0
# A connecting process proves it was started beside this engine within this time, or is dropped: the
# accept loop never waits on it (a silent client would otherwise block every later API process).
HANDSHAKE_TIMEOUT_S = 5.0


def engine_status(service: WorkerService, heap: dict | None) -> dict:
    """What API processes mirror: readiness, queue, and (once loaded) the model they build prompts for;
    `heap` is this process's C heap as last read."""
    health, model = service.health, service.model
    # accepting: loaded; whether a draining engine refuses is decided here, per request.
    status = {"accepting": health.state == "ready", "ready": health.ready(), "reason": health.reason(),
              "load_error": health.load_error, "queue_depth": service.batcher.depth(), "model": None,
              "draining": health.draining, "busy": service.batcher.busy(), "broken": health.broken,
              "pid": os.getpid(), "heap": heap}
    if status["accepting"]:
        status["model"] = {"name": model.name, "source": model.served_source, "identity": model.identity,
                           "demo_info": model.demo_info, "stand_in_info": model.stand_in_info,
                           "fallback_reason": model.fallback_reason, "describe": model.describe()}
    return status


class ApiConnection:
    """One API process: a reader thread turns its messages into jobs; a sender thread sends what the
    engine thread posts, so the engine never waits on a socket."""

    def __init__(self, conn: Connection, service: WorkerService, name: str, status: Callable[[], dict]):
        self.conn = conn
        self.service = service
        self.status = status  # the engine's status message now
        self.name = name
        self.jobs: dict[int, Job] = {}
        self._lock = threading.Condition()
        self._outbox: list[tuple] = []
        self._tokens: dict[int, list[int]] = {}  # streamed tokens of this pass, sent as one message
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True).start()
        threading.Thread(target=self._send, name=f"send-{self.name}", daemon=True).start()

    # ---- engine thread side -----------------------------------------------------------------------
    def token(self, job_id: int, token: int) -> None:
        with self._lock:
            self._tokens.setdefault(job_id, []).append(token)

    def post(self, message: tuple) -> None:
        with self._lock:
            self._move_tokens()  # a job's tokens go before its result
            self._outbox.append(message)

    def flush(self) -> None:
        with self._lock:
            if self._outbox or self._tokens:
                self._lock.notify()

    def _move_tokens(self) -> None:
        if self._tokens:
            self._outbox.append(("tokens", list(self._tokens.items())))
            self._tokens = {}

    def _send(self) -> None:
        while True:
            with self._lock:
                while not self._outbox and not self._tokens and not self.closed:
                    self._lock.wait()
                if self.closed:
                    return
                self._move_tokens()
                messages, self._outbox = self._outbox, []
            try:
                self.conn.send(messages)
            except (OSError, EOFError, ValueError):
                self._close()
                return

    # ---- reader side ------------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                for message in self.conn.recv():
                    self._handle(message)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("engine: bad message from %s; closing its connection", self.name)
        self._close()
        for job_id in list(self.jobs):  # the API process is gone: nobody waits for these
            self._cancel(job_id)

    def _handle(self, message: tuple) -> None:
        if message[0] == "submit":
            self._submit(*message[1:])
        elif message[0] == "cancel":
            self._cancel(message[1])
        elif message[0] == "drain":
            self.service.set_draining(message[1])
            self.post(("status", self.status()))  # the asking process waits for it
        self.flush()

    def _submit(self, job_id: int, kind: str, task: str, payload, deadline: float, stream: bool) -> None:
        if kind == GENERATE:
            prompt_ids, max_new_tokens, temperature, top_p = payload
            on_token = (lambda token, job_id=job_id: self.token(job_id, token)) if stream else None
            job = Job(GENERATE, task, GenerationRow(prompt_ids, max_new_tokens, temperature, top_p, deadline,
                                                    on_token=on_token), deadline)
        elif kind == SENTIMENT:
            job = Job(SENTIMENT, task, payload, deadline)
        else:
            raise ValueError(f"unknown job kind {kind!r}")
        try:
            self.service.batcher.submit(job)
        except ApiError as err:
            self.post(("done", job_id, None, _error_tuple(err), _timing(job)))
            return
        self.jobs[job_id] = job
        job.future.add_done_callback(lambda future, job_id=job_id, job=job: self._done(job_id, job))

    def _cancel(self, job_id: int) -> None:
        """Its client left or gave up: a queued job is dropped (nobody waits for its answer), a running
        generation stops at the next step."""
        job = self.jobs.get(job_id)
        if job is not None and job.cancel():
            self.jobs.pop(job_id, None)

    def _done(self, job_id: int, job: Job) -> None:
        self.jobs.pop(job_id, None)
        error = job.future.exception()
        if error is not None:
            if not isinstance(error, ApiError):
                error = ApiError(503, "model_error", "the model failed on this request")
            self.post(("done", job_id, None, _error_tuple(error), _timing(job)))
        elif job.kind == GENERATE:
            row = job.payload
            self.post(("done", job_id, (row.tokens, row.finish_reason), None, _timing(job)))
        else:
            self.post(("done", job_id, job.future.result(), None, _timing(job)))

    def _close(self) -> None:
        with self._lock:
            self.closed = True
            self._lock.notify_all()
        try:
            self.conn.close()
        except OSError:
            pass


def _receive_timeout(conn: Connection, seconds: float) -> None:
    """A receive timeout on the connection's socket (0: none): a read that waits longer fails."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000)))
    finally:
        sock.close()


def _error_tuple(err: ApiError) -> tuple:
    return err.status, err.code, err.message, err.retry_after


def _timing(job: Job) -> tuple:
    return job.enqueued_at, job.started_at, job.finished_at, job.batch_size


class EngineServer:
    """Accepts API processes' connections and serves them from one WorkerService (model + batcher)."""

    def __init__(self, service: WorkerService, address: str, authkey: bytes):
        self.service = service
        self.authkey = authkey
        # No authkey here: Listener.accept() would run the handshake itself, blocking, with no timeout.
        self.listener = Listener(address, family="AF_UNIX")
        self.connections: list[ApiConnection] = []  # replaced whole by a handshake thread, read by others
        self._admitting = threading.Lock()
        self._heap: dict | None = None
        service.batcher.after_pass = self.flush_all

    def flush_all(self) -> None:
        for connection in self.connections:
            connection.flush()

    def start(self) -> None:
        threading.Thread(target=self._accept, name="accept", daemon=True).start()
        threading.Thread(target=self._report_status, name="status", daemon=True).start()

    def _accept(self) -> None:
        count = 0
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                log.warning("engine: accept failed", exc_info=True)
                continue
            count += 1
            threading.Thread(target=self._admit, args=(conn, f"api-{count}"), name=f"handshake-{count}",
                             daemon=True).start()

    def _admit(self, conn: Connection, name: str) -> None:
        """The authkey handshake, bounded in time; then the connection is one of the API processes."""
        try:
            _receive_timeout(conn, HANDSHAKE_TIMEOUT_S)
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
            _receive_timeout(conn, 0)
        except Exception:  # the wrong key, a client that hung up, or one that said nothing in time
            log.warning("engine: refused a connection (%s)", name, exc_info=True)
            conn.close()
            return
        connection = ApiConnection(conn, self.service, name, self.status)
        connection.post(("status", self.status()))
        with self._admitting:
            self.connections = [c for c in self.connections if not c.closed] + [connection]
        connection.start()

    def status(self) -> dict:
        return engine_status(self.service, self._heap)

    def drain(self, timeout: float) -> None:
        """Wait until every API process has hung up (they finish their requests first), at most `timeout`."""
        deadline = time.monotonic() + timeout
        while any(not c.closed for c in self.connections) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _report_status(self) -> None:
        heap_read_at = float("-inf")
        while True:
            time.sleep(STATUS_INTERVAL_S)
            if time.monotonic() - heap_read_at >= HEAP_INTERVAL_S:
                self._heap, heap_read_at = memory.heap(), time.monotonic()
            status = ("status", self.status())
            for connection in self.connections:
                connection.post(status)
                connection.flush()


def _exit_with_parent() -> None:
    """gunicorn's master started this process: when it is gone (even killed), so is this engine."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1)
    log.warning("engine: the gunicorn master is gone; exiting")
    os._exit(0)


def main() -> None:
    config = WorkerConfig.from_env()
    log.info("configuration", extra={"config": config.as_log_dict()})
    address, authkey = os.environ[SOCKET_ENV], bytes.fromhex(os.environ[AUTHKEY_ENV])
    service = WorkerService(config)
    # After a sticky device error: exit, so that the API processes see the engine gone and stop the
    # instance for its supervisor to replace (a SIGTERM would wait for them to hang up first).
    service.exit_process = lambda: os._exit(70)
    server = EngineServer(service, address, authkey)
    stopping = threading.Event()
    # SIGTERM comes from the master once its API processes have exited, or to the whole process group
    # (then the API processes are finishing their requests, which this process must go on serving).
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the master stops us when done
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    service.start()
    server.start()
    log.info("engine process listening", extra={"socket": address, "pid": os.getpid()})
    while not stopping.wait(1):
        pass
    server.drain(timeout=config.chat_deadline_ms / 1000 + 10)
    service.stop()
    log.info("engine process stopped")
    sys.exit(0)


if __name__ == "__main__":
    from . import logs

    logs.configure(os.environ.get("QAIO_LOG_LEVEL", "INFO"))
    main()
