"""The engine process's end of one API process's socket: the handshake, a reader thread, a sender thread."""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Callable

from .protocol import check_hello, decode_batch, encode_batch, hello

log = logging.getLogger("qwen_worker.engine_server")

# A connecting process proves it was started beside this engine, and speaks its protocol, within this
# time, or is dropped: the accept loop never waits on it (a silent client would block every later one).
HANDSHAKE_TIMEOUT_S = 5.0


def _receive_timeout(conn: Connection, seconds: float) -> None:
    """A receive timeout on the connection's socket (0: none): a read that waits longer fails."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000)))
    finally:
        sock.close()


def admit(conn: Connection, authkey: bytes, name: str) -> bool:
    """The authkey handshake and the protocol version, bounded in time; False (and closed) when refused."""
    try:
        _receive_timeout(conn, HANDSHAKE_TIMEOUT_S)
        deliver_challenge(conn, authkey)
        answer_challenge(conn, authkey)
        check_hello(conn.recv_bytes())
        conn.send_bytes(hello())
        _receive_timeout(conn, 0)
    except Exception:  # the wrong key or version, a client that hung up, or one that said nothing in time
        log.warning("engine: refused a connection (%s)", name, exc_info=True)
        conn.close()
        return False
    return True


class ApiConnection:
    """One API process: the reader hands its messages to `handle`; the sender sends what was posted, so
    the engine thread never waits on a socket."""

    def __init__(self, conn: Connection, name: str, handle: Callable, hung_up: Callable):
        self.conn = conn
        self.name = name
        self._handle = handle
        self._hung_up = hung_up
        self._lock = threading.Condition()
        self._outbox: list = []  # messages, encoded by the sender thread, off the engine's
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True).start()
        threading.Thread(target=self._send, name=f"send-{self.name}", daemon=True).start()

    def post(self, message) -> None:
        with self._lock:
            self._outbox.append(message)

    def post_all(self, messages: list) -> None:
        """Messages sent as one, at once (none is changed after it is posted)."""
        with self._lock:
            self._outbox.extend(messages)
            self._lock.notify()

    def flush(self) -> None:
        with self._lock:
            if self._outbox:
                self._lock.notify()

    def _send(self) -> None:
        while True:
            with self._lock:
                while not self._outbox and not self.closed:
                    self._lock.wait()
                if self.closed:
                    return
                messages, self._outbox = self._outbox, []
            try:
                self.conn.send_bytes(encode_batch(messages))
            except (OSError, EOFError, ValueError):
                self._close()
                return
            except Exception:  # a message that cannot be encoded: closed, so that the API process fails loudly
                log.exception("engine: could not send to %s; closing its connection", self.name)
                self._close()
                return

    def _read(self) -> None:
        try:
            while True:
                for message in decode_batch(self.conn.recv_bytes()):
                    self._handle(self, message)
                self.flush()
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("engine: bad message from %s; closing its connection", self.name)
        self._close()
        self._hung_up(self)

    def _close(self) -> None:
        with self._lock:
            self.closed = True
            self._lock.notify_all()
        try:
            self.conn.close()
        except OSError:
            pass
