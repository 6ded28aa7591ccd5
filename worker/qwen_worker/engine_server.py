"""The engine process: one per device, it owns the model, its KV slots and the engine loop (an
EngineHost); the API processes (gunicorn's workers) reach it over a Unix socket with RemoteClient.

Why a process of its own: in one process, hundreds of HTTP threads (gunicorn's parser, Flask, JSON,
SSE writes) share one GIL with the engine thread, and the GPU waits on Python. Here the engine's
process runs only the engine thread and one reader and one sender thread per API process.

What crosses is protocol.py's messages as MessagePack, in lists (one frame carries a pass's outputs, encoded by the
connection's sender thread, off the engine's):
    API -> engine   Request, Cancel, Control
    engine -> API   Output (per pass), Status (on connect, every STATUS_INTERVAL_S, and per Control)
It imports no Flask: it builds the model and the loop directly.

    python -m qwen_worker.engine_server   (gunicorn.conf.py starts it; QAIO_ENGINE_SOCKET names the socket)
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Listener

from . import memory
from .config import WorkerConfig
from .core.host import EngineHost
from .engine_process import AUTHKEY_ENV, SOCKET_ENV
from .engine_socket import ApiConnection, admit
from .metrics import WorkerMetrics
from .protocol import Cancel, Control, Output, Request, RequestFailed

log = logging.getLogger("qwen_worker.engine_server")  # also when run as __main__

STATUS_INTERVAL_S = 0.25
# Reading the C heap (mallinfo2) takes ~8 ms with the 0.5B model loaded, holding malloc's arena locks
# that the engine thread allocates under: read it this seldom, not with every status.
HEAP_INTERVAL_S = 5.0


class EngineServer:
    """Accepts API processes' connections and serves them from one EngineHost."""

    def __init__(self, config: WorkerConfig, address: str, authkey: bytes):
        self.host = EngineHost(config, WorkerMetrics(), sink=self.route,
                               exit_process=lambda: os._exit(70))  # the API processes see the engine gone
        self.authkey = authkey
        # No authkey here: Listener.accept() would run the handshake itself, blocking, with no timeout.
        self.listener = Listener(address, family="AF_UNIX")
        self.connections: list[ApiConnection] = []  # replaced whole by a handshake thread, read by others
        self._admitting = threading.Lock()
        self._owners: dict[int, ApiConnection] = {}  # request id -> the API process waiting for it
        self.reports_stopped = threading.Event()  # ends the status push (the process's exit does too)

    def start(self) -> None:
        self.host.start()
        threading.Thread(target=self._accept, name="accept", daemon=True).start()
        threading.Thread(target=self._report_status, name="status", daemon=True).start()

    # ---- the engine's outputs, each to the process that asked ---------------------------------------
    def route(self, outputs: list[Output]) -> None:
        by_owner: dict[ApiConnection, list[Output]] = {}
        for output in outputs:
            owner = self._owners.pop(output.id, None) if output.final else self._owners.get(output.id)
            if owner is not None:
                by_owner.setdefault(owner, []).append(output)
        for connection, routed in by_owner.items():  # one lock and one wake-up per API process and pass
            connection.post_all(routed)

    # ---- messages from API processes ----------------------------------------------------------------
    def handle(self, connection: ApiConnection, message) -> None:
        if isinstance(message, Request):
            self._owners[message.id] = connection
            try:
                self.host.submit(message)
            except RequestFailed as refused:
                self._owners.pop(message.id, None)
                connection.post(Output(message.id, error=refused.code, message=refused.message))
                return
            if message.stream:  # acknowledged: its HTTP side answers 200 and starts the stream
                connection.post(Output(message.id))
        elif isinstance(message, Cancel):
            self.host.cancel(message.id, message.reason)
        elif isinstance(message, Control):
            connection.post(self.host.control(message))
        else:
            raise ValueError(f"unexpected message {type(message).__name__}")

    def hung_up(self, connection: ApiConnection) -> None:
        """An API process is gone: nobody waits for its requests any more."""
        for request_id, owner in list(self._owners.items()):
            if owner is connection:
                self._owners.pop(request_id, None)
                self.host.cancel(request_id, "client_gone")

    # ---- connections --------------------------------------------------------------------------------
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

    def _admit(self, conn, name: str) -> None:
        if not admit(conn, self.authkey, name):
            return
        connection = ApiConnection(conn, name, self.handle, self.hung_up)
        connection.post(self.host.status())
        with self._admitting:
            self.connections = [c for c in self.connections if not c.closed] + [connection]
        connection.start()

    def drain(self, timeout: float) -> None:
        """Wait until every API process has hung up (they finish their requests first), at most `timeout`."""
        deadline = time.monotonic() + timeout
        while any(not c.closed for c in self.connections) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _report_status(self) -> None:
        heap_read_at = float("-inf")
        while not self.reports_stopped.wait(STATUS_INTERVAL_S):
            try:
                if time.monotonic() - heap_read_at >= HEAP_INTERVAL_S:
                    self.host.heap, heap_read_at = memory.heap(), time.monotonic()
                status = self.host.status()
            except Exception:  # one status that cannot be built must not end every later one (the API
                log.exception("engine: status report failed")  # processes would read a stale state forever)
                continue
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
    server = EngineServer(config, address, authkey)
    stopping = threading.Event()
    # SIGTERM comes from the master once its API processes have exited, or to the whole process group
    # (then the API processes are finishing their requests, which this process must go on serving).
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the master stops us when done
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    server.start()
    log.info("engine process listening", extra={"socket": address, "pid": os.getpid()})
    while not stopping.wait(1):
        pass
    server.drain(timeout=config.chat_deadline_ms / 1000 + 10)
    server.host.stop()
    log.info("engine process stopped")
    sys.exit(0)


if __name__ == "__main__":
    from . import logs

    logs.configure(os.environ.get("QAIO_LOG_LEVEL", "INFO"))
    main()
