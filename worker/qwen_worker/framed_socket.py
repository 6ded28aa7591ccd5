"""An API process's end of the engine socket: multiprocessing.connection's frames and authkey handshake
(the engine's Listener is unchanged) over a plain socket object. multiprocessing's Connection reads its
file descriptor with os.read, which under gunicorn's gevent worker would either fail (the socket is
non-blocking there) or stall every request of the process; socket.recv waits cooperatively under gevent
and blocks as before under threads."""
from __future__ import annotations

import socket
import struct
from multiprocessing.connection import answer_challenge, deliver_challenge

_SIZE = struct.Struct("!i")
_LONG_SIZE = struct.Struct("!Q")  # after a size of -1, as multiprocessing writes frames over 2 GiB
READ_CHUNK = 1 << 18  # several frames per recv under load


class FramedSocket:
    """The subset of multiprocessing.connection.Connection the client and the handshake use."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = bytearray()

    def send_bytes(self, payload: bytes) -> None:
        size = len(payload)
        header = _SIZE.pack(size) if size <= 0x7FFFFFFF else _SIZE.pack(-1) + _LONG_SIZE.pack(size)
        if size <= 1 << 16:
            self._sock.sendall(header + payload)
        else:  # no copy of a large payload
            self._sock.sendall(header)
            self._sock.sendall(payload)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        size, = _SIZE.unpack(self._take(_SIZE.size))
        if size == -1:
            size, = _LONG_SIZE.unpack(self._take(_LONG_SIZE.size))
        if maxlength is not None and size > maxlength:
            raise OSError("bad message length")
        return self._take(size)

    def close(self) -> None:
        """Also wakes a thread blocked in recv (EOFError there); close() alone would leave it waiting."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _take(self, count: int) -> bytes:
        buffer = self._buffer
        while len(buffer) < count:
            chunk = self._sock.recv(max(READ_CHUNK, count - len(buffer)))
            if not chunk:
                raise EOFError
            buffer += chunk
        with memoryview(buffer)[:count] as frame:  # one copy out of the buffer, not a slice and then bytes
            data = bytes(frame)
        del buffer[:count]  # cheap at the front of a bytearray
        return data


def connect(address: str, authkey: bytes) -> FramedSocket:
    """Connect to a multiprocessing Listener on a Unix socket and pass its handshake, as Client() does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        conn = FramedSocket(sock)
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
    except BaseException:
        sock.close()
        raise
    return conn
