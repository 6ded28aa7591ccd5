"""The API process's end of the engine socket (framed_socket) against multiprocessing's own Listener, which
the engine process keeps: the handshake, frames of every size both ways, closing; and under gevent, as
gunicorn's gevent worker patches an API process, that waiting on it lets every other request run."""
import subprocess
import sys
import threading
from multiprocessing.connection import AuthenticationError, Listener

import pytest

from qwen_worker.framed_socket import READ_CHUNK, connect

KEY = b"k" * 32


@pytest.fixture
def listener(tmp_path):
    with Listener(str(tmp_path / "engine.sock"), family="AF_UNIX", authkey=KEY) as listener:
        yield listener


def accepted(listener, key=KEY):
    """(client, the listener's end of it): accept() runs the server's half of the handshake meanwhile."""
    ends = {}
    thread = threading.Thread(target=lambda: ends.update(server=listener.accept()))
    thread.start()
    try:
        client = connect(listener.address, key)
    finally:
        thread.join(30)
    return client, ends["server"]


def test_messages_of_every_size_cross_both_ways_in_order(listener):
    client, server = accepted(listener)
    messages = [b"small", b"x" * 70_000, b"y" * (3 * READ_CHUNK + 5), bytes(range(256)) * 40, b""]
    for sender, receiver in ((client, server), (server, client)):
        # sent back to back (from a thread: the large ones outgrow the socket's buffer), so that several
        # frames arrive in one read and one frame in several
        thread = threading.Thread(target=lambda: [sender.send_bytes(message) for message in messages])
        thread.start()
        assert [receiver.recv_bytes() for _ in messages] == messages
        thread.join(30)
    client.close()
    server.close()


def test_a_wrong_key_is_refused_by_the_handshake(listener):
    refusals = []
    thread = threading.Thread(target=lambda: refusals.append(refusal(listener)))
    thread.start()
    with pytest.raises(AuthenticationError):
        connect(listener.address, b"wrong" * 8)
    thread.join(30)
    assert refusals == [AuthenticationError]  # by both ends


def refusal(listener):
    """The exception the listener's accept() raised, or None when it admitted the connection."""
    try:
        listener.accept().close()
    except Exception as exc:
        return type(exc)
    return None


def test_closing_wakes_a_thread_blocked_in_recv(listener):
    client, server = accepted(listener)
    outcome = []

    def reader():
        try:
            client.recv_bytes()
        except (EOFError, OSError) as exc:
            outcome.append(type(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    client.close()
    thread.join(30)
    assert not thread.is_alive() and outcome
    server.close()


def test_the_peer_hanging_up_is_an_end_of_file(listener):
    client, server = accepted(listener)
    server.close()
    with pytest.raises(EOFError):
        client.recv_bytes()


LISTENER_SCRIPT = r"""
import sys
from multiprocessing.connection import Listener
with Listener(sys.argv[1], family="AF_UNIX", authkey=b"k" * 32) as listener:
    print("listening", flush=True)
    conn = listener.accept()
    conn.send_bytes(b"answer to " + conn.recv_bytes())
"""

# An API process as gunicorn's gevent worker patches it, against an engine-like listener in a process of its own.
GEVENT_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import socket, subprocess, sys
import gevent
from qwen_worker.connection import disconnect_probe
from qwen_worker.framed_socket import connect

address = sys.argv[1]
engine = subprocess.Popen([sys.executable, "-c", sys.argv[2], address], stdout=subprocess.PIPE, text=True)
assert engine.stdout.readline().strip() == "listening"
client = connect(address, b"k" * 32)
received = []
reader = gevent.spawn(lambda: received.append(client.recv_bytes()))
ticks = 0
while not reader.ready():  # the hub runs other greenlets while the reader waits
    ticks += 1
    if ticks == 50:
        client.send_bytes(b"go")
    gevent.sleep(0)
assert received == [b"answer to go"] and ticks >= 50, (received, ticks)
engine.wait()

near, far = socket.socketpair()
client_gone = disconnect_probe({"gunicorn.socket": near})
assert client_gone() is False  # at once, with nothing to read: gevent's own recv would wait here
far.close()
assert client_gone() is True
print("ok")
"""


def test_under_gevent_a_wait_on_the_engine_or_the_client_blocks_no_other_request(tmp_path):
    result = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT, str(tmp_path / "engine.sock"), LISTENER_SCRIPT],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
