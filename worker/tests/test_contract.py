"""The engine contract, the same for both layouts: one process (the engine loop on a thread) and an
engine process beside API processes. Every test runs against real gunicorn instances of each."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from qaio_testing import GunicornServer, eventually, metric

pytestmark = pytest.mark.gunicorn

TOKEN = "contract-admin-token-0123456789"
LAYOUTS = {
    "one-process": {"QAIO_ENGINE_PROCESS": "off"},
    "engine-process": {"QAIO_ENGINE_PROCESS": "on", "QAIO_WORKERS": "2"},
}
# Admission by estimate off: the queue tests below want a request to wait out its deadline in the queue
# (test_queueing.py and core/test_admission.py test the estimate).
COMMON = {"QAIO_ADMIT_BY_ESTIMATE": "false", "QAIO_MAX_BATCH_SIZE": "2", "QAIO_QUEUE_CAPACITY": "1", "QAIO_THREADS": "16", "QAIO_TORCH_THREADS": "1",
          "QAIO_ADMIN_TOKEN": TOKEN, "QAIO_RETRY_AFTER_S": "2"}
LONG = 1000  # max_tokens of a generation meant to be stopped early
CHAT = {"messages": [{"role": "user", "content": "你好，介绍一下你自己"}], "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request, tiny_model_dir):
    instance = GunicornServer(tiny_model_dir, **COMMON, **LAYOUTS[request.param])
    try:
        yield instance.wait_ready()
    finally:
        instance.stop()


def post(server, path, body, **kwargs):
    return requests.post(server.url + path, json=body, timeout=60, **kwargs)


def events(response) -> list:
    return [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True)
            if line and line != "data: [DONE]"]


class LongStream:
    """A streamed generation holding a slot until closed."""

    def __init__(self, server):
        self.response = post(server, "/v1/chat", {"text": "a long story", "max_tokens": LONG, "temperature": 0,
                                                  "stream": True}, stream=True)
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines(decode_unicode=True)
        assert next(line for line in self.lines if line).startswith("data: ")  # generating now

    def close(self):
        self.response.close()


def uncached(usage: dict | None) -> dict | None:
    """Usage without the prefix cache's share, which depends on what each instance served before."""
    return None if usage is None else {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


def idle(server):
    eventually(lambda: requests.get(server.url + "/readyz", timeout=5).json()["requests_held"] == 0,
               what="the instance holds no request")


def test_answers_equal_the_in_process_service(server, client):
    """Prompts built and replies decoded by the HTTP side, tokens made by the engine: the same answers
    whichever transport is between them."""
    sentiment = {"text": "送餐太慢了，饭菜都凉了"}
    without_messages = {k: v for k, v in CHAT.items() if k != "messages"}
    for path, body in (("/v1/chat", CHAT), ("/v1/sentiment", sentiment), ("/v1/analyze", {**without_messages, **sentiment})):
        started = time.perf_counter()
        remote = post(server, path, body)
        remote_ms = (time.perf_counter() - started) * 1000
        local = client.post(path, json=body)
        assert remote.status_code == local.status_code == 200, remote.text
        r, l = remote.json(), local.get_json()
        assert r.get("reply") == l.get("reply") and uncached(r.get("usage")) == uncached(l.get("usage"))
        if "sentiment" in l:
            for label, score in l["sentiment"]["scores"].items():
                assert r["sentiment"]["scores"][label] == pytest.approx(score, abs=1e-4)
        assert r["timing"]["compute_ms"] > 0 and r["timing"]["batch_size"] >= 1
        assert r["timing"]["queue_ms"] + r["timing"]["compute_ms"] <= remote_ms  # within what the client waited
    completion = post(server, "/v1/chat/completions", CHAT).json()
    assert completion["choices"][0]["message"]["content"] == client.post("/v1/chat", json=CHAT).get_json()["reply"]


def test_a_stream_adds_up_to_the_answer(server):
    reply = post(server, "/v1/chat", CHAT).json()["reply"]
    streamed = events(post(server, "/v1/chat", {**CHAT, "stream": True}, stream=True))
    assert "".join(e.get("delta", "") for e in streamed) == reply
    assert streamed[-1]["done"] is True and streamed[-1]["usage"]["completion_tokens"] == 12
    chunks = events(post(server, "/v1/chat/completions", {**CHAT, "stream": True}, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == reply


def test_deadlines_end_a_generation_and_a_stream(server):
    late = post(server, "/v1/chat", {"text": "write forever", "max_tokens": LONG, "temperature": 0, "deadline_ms": 400})
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    # A stream that started gets what it generated, then finish_reason "deadline" (the engine ends it there,
    # the HTTP side still waiting within its grace).
    streamed = events(post(server, "/v1/chat", {"text": "write forever", "max_tokens": LONG, "temperature": 0,
                                                "stream": True}, headers={"X-Deadline-Ms": "400"}, stream=True))
    assert streamed[-1]["finish_reason"] == "deadline"
    assert 0 < streamed[-1]["usage"]["completion_tokens"] < LONG
    idle(server)


def test_a_full_queue_refuses_at_once_and_a_queued_deadline_answers_504(server):
    refusals_before = metric(server, "qaio_rejections_total", '{reason="queue_full"}')
    held = [LongStream(server), LongStream(server)]  # both slots
    try:
        waiting = {}
        queued = threading.Thread(target=lambda: waiting.update(response=post(
            server, "/v1/chat", {"text": "next", "max_tokens": 2, "deadline_ms": 2000})))
        queued.start()
        eventually(lambda: requests.get(server.url + "/readyz", timeout=5).json()["queue_depth"] == 1,
                   what="the third request waits in the queue")
        for body in ({"text": "fourth", "max_tokens": 2}, {"text": "fourth", "max_tokens": 2, "stream": True}):
            refused = post(server, "/v1/chat", body)  # a refused stream is an HTTP error too, never a 200
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "2"
            assert refused.json()["error"]["code"] == "queue_full"
        queued.join(30)
        assert waiting["response"].status_code == 504
        assert waiting["response"].json()["error"]["code"] == "deadline_exceeded"
    finally:
        for stream in held:
            stream.close()
    idle(server)
    # This test's own two refusals (the module's other tests refuse none for a full queue).
    eventually(lambda: metric(server, "qaio_rejections_total", '{reason="queue_full"}') == refusals_before + 2,
               what="the two refusals counted")
    assert post(server, "/v1/chat", {"text": "after", "max_tokens": 2}).status_code == 200


def test_a_closed_stream_stops_its_row(server):
    before = metric(server, "qaio_generated_tokens_total", '{task="chat"}')
    LongStream(server).close()
    eventually(lambda: metric(server, "qaio_live_slots") == 0, what="the row is stopped")
    generated = eventually(lambda: metric(server, "qaio_generated_tokens_total", '{task="chat"}') - before,
                           what="the stopped row's tokens counted")
    assert 0 < generated < LONG


def test_drain_and_undrain(server):
    admin = {"Authorization": f"Bearer {TOKEN}"}
    drained = requests.post(server.url + "/admin/drain", headers=admin, timeout=10).json()
    assert drained["draining"] is True and drained["status"] == "drained"  # answered once the engine applied it
    refused = post(server, "/v1/sentiment", {"text": "还开着吗"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    # Every API process's readiness follows within a status interval (the engine itself refused at once).
    eventually(lambda: requests.get(server.url + "/readyz", timeout=5).status_code == 503, what="/readyz says 503")
    undrained = requests.post(server.url + "/admin/undrain", headers=admin, timeout=10).json()
    assert undrained["draining"] is False and undrained["status"] == "ready"
    assert post(server, "/v1/sentiment", {"text": "还开着吗"}).status_code == 200  # at once, in every process
    assert requests.get(server.url + "/admin/state", headers=admin, timeout=10).json()["status"] == "ready"


def test_the_engine_counts_what_it_did(server):
    before = metric(server, "qaio_prompt_tokens_total", '{task="sentiment"}')
    assert post(server, "/v1/sentiment", {"text": "计数"}).status_code == 200
    eventually(lambda: metric(server, "qaio_prompt_tokens_total", '{task="sentiment"}') > before,
               what="the sentiment prompt counted")
    assert metric(server, "qaio_slots") == 2
    assert metric(server, "qaio_queue_wait_seconds_count", '{task="sentiment"}') >= 1
    assert metric(server, "qaio_batch_size_count", '{kind="sentiment"}') >= 1


def test_a_sticky_device_error_answers_what_it_held_and_ends_the_process(gunicorn_server):
    """One process: a sticky device error ends the process (gunicorn forks a fresh one); what was held
    is answered 503 at once, never left hanging."""
    server = gunicorn_server(app="qaio_testing:device_error_app()", QAIO_DEVICE_ERROR_EXIT_S="1",
                             **COMMON, **LAYOUTS["one-process"])
    held = post(server, "/v1/chat", {"text": "inject a device error", "max_tokens": 4})
    assert held.status_code == 503 and held.json()["error"]["code"] == "device_error"
    assert eventually(lambda: "sticky device error" in server.log_path.read_text(), what="logged")


def test_a_killed_engine_process_answers_what_it_held_and_ends_the_instance(gunicorn_server):
    """Engine process: the engine killed ends the instance (its supervisor starts a new one); what was
    held is answered 503 at once, never left hanging."""
    server = gunicorn_server(**COMMON, **LAYOUTS["engine-process"])
    answer = {}
    waiting = threading.Thread(target=lambda: answer.update(response=post(
        server, "/v1/chat", {"text": "a long story", "max_tokens": LONG, "temperature": 0})))
    waiting.start()
    eventually(lambda: metric(server, "qaio_live_slots") == 1, what="the request generates")
    os.kill(_engine_pid(server), signal.SIGKILL)
    waiting.join(60)
    assert answer["response"].status_code == 503 and answer["response"].json()["error"]["code"] == "engine_lost"
    server.proc.wait(timeout=60)  # no half-alive instance: compose/Kubernetes restart it whole
    assert "the engine process exited; stopping this instance" in server.log_path.read_text()


def _engine_pid(server) -> int:
    for pid in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split():
        if "qwen_worker.engine_server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return int(pid)
    raise AssertionError("no engine process under the gunicorn master")
