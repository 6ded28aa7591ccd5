"""Continuous batching (QAIO_GENERATION=continuous) on the real tiny model: same answers as static
batching, and a request joins a generation that is already running instead of waiting for it."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from qwen_worker.prompts import Message


@pytest.fixture(scope="module")
def continuous_app(make_app):
    return make_app(generation="continuous", max_batch_size=4)


def greedy_replies(app, requests):
    def post(body):
        response = app.test_client().post("/v1/chat", json={**body, "temperature": 0})
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(post, requests))


REQUESTS = [{"text": "你好", "max_tokens": 12}, {"text": "a much longer question about the weather " * 3,
                                                   "max_tokens": 5},
            {"messages": [{"role": "user", "content": "短"}], "max_tokens": 20}, {"text": "🍜 ok", "max_tokens": 1}]


def test_greedy_replies_equal_static_batching(app, continuous_app):
    static = greedy_replies(app, REQUESTS)
    continuous = greedy_replies(continuous_app, REQUESTS)
    for request, a, b in zip(REQUESTS, static, continuous):
        assert b["reply"] == a["reply"]
        assert b["finish_reason"] == a["finish_reason"]
        assert b["usage"] == a["usage"]
        assert b["usage"]["completion_tokens"] <= request["max_tokens"]


def test_a_request_joins_a_running_generation_instead_of_waiting_for_it(continuous_app, blocker):
    service = continuous_app.extensions["qaio"]
    long_job = blocker.occupy(service)
    short = service.submit_generation(service.chat_ids([Message("user", "插队")]), 3, 0.0, 1.0,
                                      service.deadline(30_000), task="chat")
    row = short.wait()
    assert row.finish_reason in ("stop", "length") and len(row.tokens) <= 3
    assert not long_job.future.done(), "the short request finished while the long one kept generating"
    blocker.release(long_job)


def test_sampled_rows_keep_their_limits(continuous_app):
    service = continuous_app.extensions["qaio"]
    jobs = [service.submit_generation(service.chat_ids([Message("user", f"sample {i}")]), 6, 1.2, 0.8,
                                      service.deadline(30_000), task="chat") for i in range(6)]
    for job in jobs:
        row = job.wait()
        assert 1 <= len(row.tokens) <= 6
        assert row.finish_reason == "length" if len(row.tokens) == 6 else row.finish_reason == "stop"
        assert not set(row.tokens) & service.model.eos_token_ids


def test_a_stream_carries_the_same_text_as_the_plain_answer(continuous_app):
    client = continuous_app.test_client()
    body = {"text": "stream me", "max_tokens": 10, "temperature": 0}
    plain = client.post("/v1/chat", json=body).get_json()
    events = [json.loads(frame[len("data: "):])
              for frame in client.post("/v1/chat", json={**body, "stream": True}).get_data(as_text=True).split("\n\n")
              if frame.startswith("data: ") and frame != "data: [DONE]"]
    assert "".join(e.get("delta", "") for e in events) == plain["reply"]
    assert events[-1]["finish_reason"] == plain["finish_reason"]


def test_readiness_and_metrics_describe_the_continuous_batch(continuous_app):
    client = continuous_app.test_client()
    greedy_replies(continuous_app, REQUESTS)
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'qaio_batch_size_count{kind="generate"}' in metrics
    assert 'qaio_generated_tokens_total{task="chat"}' in metrics
