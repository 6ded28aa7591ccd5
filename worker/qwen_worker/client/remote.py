"""The engine in an engine process of its own (engine_server), reached over a Unix socket: the default
on a GPU, where the HTTP threads of several API processes must not share the engine's GIL."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future

from ..engine_process import AUTHKEY_ENV, ENGINE_PID_ENV, MASTER_PID_ENV, SOCKET_ENV
from ..framed_socket import FramedSocket, connect
from ..metrics import WorkerMetrics
from ..prompts import ChatMLPrompter, load_tokenizer
from ..protocol import (Cancel, Control, Output, Request, RequestFailed, Status, check_hello, decode_batch, encode_batch,
                        hello)
from .base import EngineClient

log = logging.getLogger(__name__)

CONNECT_RETRY_S = 0.2
CONTROL_TIMEOUT_S = 10.0
LOST = "the model process of this instance stopped"


class RemoteClient(EngineClient):
    def __init__(self, config, metrics: WorkerMetrics, address: str, authkey: bytes):
        super().__init__()
        self.config = config
        self.metrics = metrics
        self.address = address
        self.authkey = authkey
        self._status = Status("loading")
        self._conn: FramedSocket | None = None
        self._send_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list = []
        self._replies: dict[int, Future] = {}
        self._control_ids = iter(range(1, 2**62))
        self._stopping = False
        self.lost: str | None = None  # why this instance can serve nothing any more

    @classmethod
    def from_env(cls, config, metrics: WorkerMetrics) -> "RemoteClient":
        return cls(config, metrics, os.environ[SOCKET_ENV], bytes.fromhex(os.environ[AUTHKEY_ENV]))

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
                conn = connect(self.address, self.authkey)
                conn.send_bytes(hello())
                check_hello(conn.recv_bytes())
                self._conn = conn
            except (FileNotFoundError, ConnectionRefusedError):
                if not _engine_alive():
                    self._lose("the engine process exited before it listened")
                    return
                time.sleep(CONNECT_RETRY_S)
            except ValueError as exc:  # another protocol version: a half-upgraded instance
                self._lose(str(exc))
                return
            except Exception as exc:  # a refused key, a broken handshake: never a silent "loading" forever
                self._lose(f"could not connect to the engine process: {type(exc).__name__}: {exc}")
                return
        try:
            while True:
                messages = decode_batch(self._conn.recv_bytes())
                outputs = [message for message in messages if isinstance(message, Output)]
                if outputs:
                    self.deliver(outputs)
                for message in messages:
                    if isinstance(message, Status):
                        self._on_status(message)
        except (EOFError, OSError):  # the engine hung up, or stop() shut the socket under recv()
            pass
        except Exception as exc:  # a message this side cannot read: what waits would otherwise hang
            log.exception("engine client: a message from the engine process failed")
            self._lose(f"a message from the engine process failed: {type(exc).__name__}: {exc}")
            return
        if not self._stopping:
            self._lose("the engine process exited")

    def _lose(self, why: str) -> None:
        """Without its engine this instance can serve nothing: fail what waits, and stop the instance so
        that its supervisor (compose, Kubernetes) starts a whole new one."""
        log.critical("%s; stopping this instance", why)
        self.lost = why
        self.metrics.ready.set(0)
        self.fail_all("engine_lost", LOST)
        for reply in list(self._replies.values()):
            reply.set_exception(RequestFailed("engine_lost", LOST))
        master = os.environ.get(MASTER_PID_ENV)
        if master:
            os.kill(int(master), signal.SIGTERM)

    # ---- from the engine ----------------------------------------------------------------------
    def _on_status(self, status: Status) -> None:
        if status.accepting and self.prompter is None and status.model is not None:
            try:
                self.prompter = ChatMLPrompter(load_tokenizer(status.model.source))
            except Exception as exc:
                log.exception("could not load the tokenizer of %s", status.model.source)
                self.lost = f"tokenizer of {status.model.source}: {type(exc).__name__}: {exc}"
        self._status = status
        self.metrics.ready.set(1 if self.status().ready else 0)
        self.metrics.draining.set(1 if status.draining else 0)
        reply = self._replies.pop(status.reply_to, None) if status.reply_to else None
        if reply is not None:
            reply.set_result(status)

    # ---- the contract -------------------------------------------------------------------------
    def status(self) -> Status:
        status = self._status
        if self.lost is not None:
            return Status("failed", broken=self.lost, load_error=self.lost, model=status.model)
        if status.accepting and self.prompter is None:  # prompts cannot be built here yet
            return Status("loading", queue_depth=status.queue_depth, model=status.model)
        return status

    def control(self, op: str) -> Status:
        reply: Future = Future()
        control_id = next(self._control_ids)
        self._replies[control_id] = reply
        try:
            self._send(Control(control_id, op))
            return reply.result(timeout=CONTROL_TIMEOUT_S)
        finally:
            self._replies.pop(control_id, None)

    def send_request(self, request: Request, handle) -> None:
        """A stream waits for the engine's acknowledgement, so that a refusal (queue full, draining) is
        an HTTP error that nginx can retry elsewhere, not an error event after a 200, as in-process."""
        self._send(request)
        if not request.stream:
            return  # a refusal is its final output, raised by wait()
        if not handle.arrived.wait(CONTROL_TIMEOUT_S):
            raise RequestFailed("engine_lost", "the model process of this instance did not answer")
        first = handle.first
        if first.error is not None:
            raise RequestFailed(first.error, first.message)

    def send_requests(self, requests: list[Request]) -> list[RequestFailed | None]:
        """In one frame; refusals arrive as the requests' final outputs. An engine out of reach refuses all."""
        try:
            self._send(*requests)
        except RequestFailed as failed:
            return [failed] * len(requests)
        return [None] * len(requests)

    def send_cancel(self, cancel: Cancel) -> None:
        try:
            self._send(cancel)
        except RequestFailed:
            pass  # the engine is gone: nothing runs for it any more

    def _send(self, *messages) -> None:
        """Messages posted while another thread is sending go in the next send, together (one
        syscall and one encoding for many requests under load); order is kept."""
        with self._pending_lock:
            self._pending.extend(messages)
        try:
            with self._send_lock:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                if batch:  # empty: another thread sent ours with its own
                    self._conn.send_bytes(encode_batch(batch))
        except (OSError, AttributeError, ValueError):
            raise RequestFailed("engine_lost", "the model process of this instance is not reachable") from None

    def other_heaps(self) -> dict[int, dict[str, int]]:
        status = self._status
        return {status.pid: status.heap} if status.heap else {}


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
