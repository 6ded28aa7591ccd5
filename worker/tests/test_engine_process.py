"""The engine-process layout (QAIO_ENGINE_PROCESS=on): gunicorn's processes speak HTTP, one engine
process runs the model; real processes started by gunicorn.conf.py, spoken to over HTTP."""
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from qwen_worker.testing import eventually, metric

SPLIT = {"QAIO_ENGINE_PROCESS": "on", "QAIO_WORKERS": "2", "QAIO_THREADS": "16"}
LONG = 1000  # max_tokens of a generation meant to be stopped early


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


def test_answers_equal_the_one_process_layout(split_server, client):
    """Prompts are built and replies decoded in the API process, tokens made in the engine: same answers."""
    chat = {"messages": [{"role": "user", "content": "你好，介绍一下你自己"}], "max_tokens": 12, "temperature": 0}
    sentiment = {"text": "送餐太慢了，饭菜都凉了"}
    for path, body in (("/v1/chat", chat), ("/v1/sentiment", sentiment), ("/v1/analyze", {**sentiment, **chat})):
        remote = requests.post(split_server.url + path, json=body, timeout=60)
        local = client.post(path, json=body)
        assert remote.status_code == local.status_code == 200, remote.text
        r, l = remote.json(), local.get_json()
        assert r.get("reply") == l.get("reply") and r.get("usage") == l.get("usage")
        if "sentiment" in l:
            assert r["sentiment"]["label"] == l["sentiment"]["label"]
            for label, score in l["sentiment"]["scores"].items():
                assert r["sentiment"]["scores"][label] == pytest.approx(score, abs=1e-4)
        assert r["timing"]["compute_ms"] > 0 and r["timing"]["batch_size"] >= 1

    streamed = requests.post(split_server.url + "/v1/chat", json={**chat, "stream": True}, stream=True, timeout=60)
    events = [json.loads(line[6:]) for line in streamed.iter_lines(decode_unicode=True) if line]
    assert "".join(e.get("delta", "") for e in events) == client.post("/v1/chat", json=chat).get_json()["reply"]
    assert events[-1]["done"] is True and events[-1]["usage"]["completion_tokens"] == 12

    ready = requests.get(split_server.url + "/readyz", timeout=10).json()
    assert ready["status"] == "ready" and ready["slots"] == 16 and ready["model"] == "tiny"


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


def test_a_closed_stream_stops_its_row_in_the_engine(split_server):
    response = requests.post(split_server.url + "/v1/chat", stream=True, timeout=60,
                             json={"text": "a long story", "max_tokens": LONG, "temperature": 0, "stream": True})
    lines = response.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line).startswith("data: ")
    response.close()
    eventually(lambda: metric(split_server, "qaio_live_slots") == 0, what="the row is stopped")
    # Counted once, when the row ends: more than 0 (it streamed), fewer than it was allowed.
    generated = eventually(lambda: metric(split_server, "qaio_generated_tokens_total", '{task="chat"}'),
                           what="the stopped row's tokens counted")
    assert generated < LONG


def test_queue_bound_and_deadline_hold_across_the_process_boundary(gunicorn_server):
    server = gunicorn_server(**SPLIT, QAIO_MAX_BATCH_SIZE="1", QAIO_QUEUE_CAPACITY="1")
    long_stream = requests.post(server.url + "/v1/chat", stream=True, timeout=60,
                                json={"text": "story", "max_tokens": LONG, "temperature": 0, "stream": True})
    events = long_stream.iter_lines(decode_unicode=True)  # held: a dropped iterator closes the stream
    assert next(line for line in events if line)
    waiting = {}
    queued = threading.Thread(target=lambda: waiting.update(response=requests.post(
        server.url + "/v1/chat", json={"text": "next", "max_tokens": 2, "deadline_ms": 1500}, timeout=60)))
    queued.start()
    eventually(lambda: requests.get(server.url + "/readyz", timeout=5).json()["queue_depth"] == 1,
               what="the second request waits in the engine's queue")
    started = time.monotonic()
    refused = requests.post(server.url + "/v1/chat", json={"text": "third", "max_tokens": 2}, timeout=60)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "queue_full" and time.monotonic() - started < 5  # no wait
    queued.join(30)
    assert waiting["response"].status_code == 504  # its deadline passed while the slot stayed taken
    assert waiting["response"].json()["error"]["code"] == "deadline_exceeded"
    long_stream.close()
    eventually(lambda: requests.get(server.url + "/readyz", timeout=5).json()["queue_depth"] == 0,
               what="the expired job left the engine's queue")
    eventually(lambda: metric(server, "qaio_live_slots") == 0, what="the closed stream's row is stopped")
    assert requests.post(server.url + "/v1/chat", json={"text": "after", "max_tokens": 2}, timeout=60).status_code == 200


def test_the_instance_stops_when_its_engine_process_dies(gunicorn_server):
    """No half-alive instance: without its engine the whole instance exits, for compose/Kubernetes to restart."""
    server = gunicorn_server(**SPLIT)
    os.kill(engine_pid(server), signal.SIGKILL)
    server.proc.wait(timeout=60)
    assert "the engine process exited; stopping this instance" in server.log_path.read_text()


def test_a_silent_connection_to_the_engine_socket_blocks_nobody(split_server):
    """A same-user process that connects and says nothing: the next API process is admitted at once, and
    the silent one is dropped after the handshake's timeout."""
    import socket
    from multiprocessing.connection import Client

    from qwen_worker.engine_process import AUTHKEY_ENV, SOCKET_ENV
    from qwen_worker.engine_socket import HANDSHAKE_TIMEOUT_S
    from qwen_worker.protocol import Status, check_hello, decode, hello

    environ = dict(item.split("=", 1) for item in
                   Path(f"/proc/{engine_pid(split_server)}/environ").read_text().split("\0") if "=" in item)
    address, authkey = environ[SOCKET_ENV], bytes.fromhex(environ[AUTHKEY_ENV])
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(address)
    admitted = {}

    def connect():
        conn = Client(address, family="AF_UNIX", authkey=authkey)
        conn.send(hello())
        check_hello(conn.recv())
        admitted["status"] = decode(conn.recv()[0])  # the engine greets every API process with its status
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
