"""What only the engine-process layout (QAIO_ENGINE_PROCESS=on) has: metrics from several processes and
its socket. What both layouts share (answers, streams, deadlines, queue, drain, loss) is test_contract.py."""
import re
import threading
from pathlib import Path

import pytest
import requests

from qaio_testing import eventually, metric

SPLIT = {"QAIO_ENGINE_PROCESS": "on", "QAIO_WORKERS": "2", "QAIO_THREADS": "16"}


def engine_pid(server) -> int:
    """The engine process: the gunicorn master's child running qwen_worker.engine_server."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    for pid in children:
        if "qwen_worker.engine_server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return int(pid)
    raise AssertionError("no engine process under the gunicorn master")


@pytest.fixture()
def split_server(gunicorn_server):
    return gunicorn_server(**SPLIT)


def test_engine_metrics_reach_every_api_process(split_server):
    with requests.Session() as session:
        for i in range(6):
            assert session.post(split_server.url + "/v1/chat", timeout=60,
                                json={"text": f"hi {i}", "max_tokens": 4, "temperature": 0}).status_code == 200
    # The engine process counts; its counters are read from its files by whichever process scrapes.
    eventually(lambda: metric(split_server, "qaio_generated_tokens_total", '{task="chat"}') == 24,
               what="24 tokens counted")
    assert metric(split_server, "qaio_decode_step_seconds_count", '{path="eager"}') > 0
    assert metric(split_server, "qaio_slots") == 16
    # The engine and both API processes say ready (each sets its own gauge), and the engine process's C
    # heap is reported too (that is where the model's memory lives; its status carries it).
    heap = rf'^qaio_heap_bytes\{{kind="in_use",pid="{engine_pid(split_server)}"\}} [1-9]'

    def ready_and_heap() -> bool:
        text = requests.get(split_server.url + "/metrics", timeout=10).text
        return len(re.findall(r'^qaio_ready\{pid="\d+"\} 1\.0$', text, re.M)) == 3 and bool(re.search(heap, text, re.M))

    eventually(ready_and_heap, what="three ready processes and the engine's heap")


def test_a_silent_connection_to_the_engine_socket_blocks_nobody(split_server):
    """A same-user process that connects and says nothing: the next API process is admitted at once, and
    the silent one is dropped after the handshake's timeout."""
    import socket
    from multiprocessing.connection import Client

    from qwen_worker.engine_process import AUTHKEY_ENV, SOCKET_ENV
    from qwen_worker.engine_socket import HANDSHAKE_TIMEOUT_S
    from qwen_worker.protocol import Status, check_hello, decode_batch, hello

    environ = dict(item.split("=", 1) for item in
                   Path(f"/proc/{engine_pid(split_server)}/environ").read_text().split("\0") if "=" in item)
    address, authkey = environ[SOCKET_ENV], bytes.fromhex(environ[AUTHKEY_ENV])
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(address)
    admitted = {}

    def connect():
        conn = Client(address, family="AF_UNIX", authkey=authkey)
        conn.send_bytes(hello())
        check_hello(conn.recv_bytes())
        admitted["status"] = decode_batch(conn.recv_bytes())[0]  # the engine greets every API process with its status
        conn.close()

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HANDSHAKE_TIMEOUT_S - 1)  # well before the silent one could time out
    assert isinstance(admitted.get("status"), Status), "a silent connection blocked the accept loop"
    silent.settimeout(HANDSHAKE_TIMEOUT_S + 30)
    try:
        leftover = silent.recv(4096)  # the engine's challenge, then nothing until it hangs up
        while leftover:
            leftover = silent.recv(4096)
    finally:
        silent.close()
    assert requests.post(split_server.url + "/v1/sentiment", json={"text": "还好"}, timeout=30).status_code == 200


def test_stopping_closes_idle_keep_alive_connections_and_answers_what_is_in_flight(gunicorn_server):
    """The API processes' gevent worker: nginx keeps idle upstream connections open, and a SIGTERM must
    not wait out their keep-alive (75 s) while the request in flight still gets its whole answer."""
    import http.client
    import signal

    server = gunicorn_server(**SPLIT, QAIO_STEP_DELAY_MS="20")
    assert "ClosingGeventWorker" in server.log_path.read_text()
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    idle.request("GET", "/healthz")
    assert idle.getresponse().read() and idle.sock is not None  # kept alive, now idle
    answer = {}
    flight = threading.Thread(target=lambda: answer.update(response=requests.post(
        server.url + "/v1/chat", json={"text": "a story", "max_tokens": 60, "temperature": 0}, timeout=120)))
    flight.start()
    eventually(lambda: metric(server, "qaio_live_slots") == 1, what="the request generates")
    server.proc.send_signal(signal.SIGTERM)
    assert idle.sock.recv(1) == b""  # closed by the server well before its keep-alive of 75 s (timeout 60)
    flight.join(120)
    assert answer["response"].status_code == 200 and answer["response"].json()["usage"]["completion_tokens"] == 60
    server.proc.wait(timeout=60)
    assert "graceful timeout" not in server.log_path.read_text()
