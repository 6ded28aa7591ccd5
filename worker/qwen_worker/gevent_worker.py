"""gunicorn's gevent worker, which also closes its idle keep-alive connections when it stops.

gunicorn's async workers wait on a keep-alive connection for its next request for up to `keepalive`
seconds, and a stopping worker waits for every connection's greenlet: behind nginx, whose upstream
keep-alive connections stay open, each SIGTERM (a rolling update, a lost engine) would take the whole
keep-alive time (75 s) instead of the requests in flight. gthread drops idle connections at once; so
does this. A connection busy with a request closes after its answer, as gunicorn does anyway once stopping.
"""
from __future__ import annotations

import contextlib
import socket

import gevent
from gunicorn.workers.ggevent import GeventWorker

from .connection import os_socket, peek


class ClosingGeventWorker(GeventWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients: dict = {}  # greenlet -> the client socket it serves
        self._idle: set = set()  # greenlets waiting for a next request

    def handle(self, listener, client, addr):
        current = gevent.getcurrent()
        self._clients[current] = client
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(current, None)
            self._idle.discard(current)

    @contextlib.contextmanager
    def timeout_ctx(self):
        """gunicorn enters this exactly around the wait for a connection's next request."""
        current = gevent.getcurrent()
        self._idle.add(current)
        if not self.alive:  # a request that began before the stop has been answered
            self._end_wait(current)
        try:
            with super().timeout_ctx():
                yield
        finally:
            self._idle.discard(current)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        gevent.spawn(lambda: [self._end_wait(greenlet) for greenlet in list(self._idle)])

    def _end_wait(self, greenlet) -> None:
        """An idle connection reads end-of-file and its greenlet ends as if its client had closed it; one
        whose next request is arriving is left to answer it (then closes: gunicorn, stopping)."""
        client = self._clients.get(greenlet)
        if client is None:
            return
        # On the OS socket: gevent's shutdown would fail the waiting greenlet with EBADF instead of letting
        # it read the end.
        raw = os_socket(client)
        with contextlib.suppress(OSError):
            if not peek(raw):
                raw.shutdown(socket.SHUT_RD)
