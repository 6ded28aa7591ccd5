"""What a request's connection tells beyond its body: when the front door received it, and whether
its client is still there."""
from __future__ import annotations

import re
import socket
import time
from typing import Callable

_REQUEST_START = re.compile(r"t=([0-9]{9,11}(?:\.[0-9]{1,6})?)", re.ASCII)
MAX_FRONT_DOOR_AGE_S = 3600.0  # an older stamp is a broken clock, not a request that waited an hour


def arrival(request_start: str | None, now: float | None = None) -> float:
    """The time.monotonic() at which the front door received the request: nginx stamps
    `X-Request-Start: t=<unix seconds>`; without a (sane) stamp, now. Clocks of hosts in one cluster
    are NTP-synchronised; a stamp from the future counts as now."""
    now = time.monotonic() if now is None else now
    match = _REQUEST_START.fullmatch((request_start or "").strip())
    if not match:
        return now
    age = time.time() - float(match.group(1))
    return now - min(max(age, 0.0), MAX_FRONT_DOOR_AGE_S)


def disconnect_probe(environ: dict) -> Callable[[], bool] | None:
    """A cheap check whether the client closed its connection (nginx closes the upstream connection
    when its client aborts or times out); None where the server gives no socket (the test client)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None
    sock = os_socket(sock)

    def client_gone() -> bool:
        try:
            return peek(sock) == b""  # None: open, nothing sent, the client waits for its answer
        except OSError:
            return True  # reset

    return client_gone


def os_socket(sock: socket.socket) -> socket.socket:
    """The OS socket under gevent's, whose recv would wait for data even with MSG_DONTWAIT; a plain one as is."""
    return getattr(sock, "_sock", sock)


def peek(sock: socket.socket) -> bytes | None:
    """At once: the next byte without taking it, b"" when the peer closed, None when nothing is there yet."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
