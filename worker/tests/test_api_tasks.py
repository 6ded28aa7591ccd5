"""The product's API on an in-process app: sentiment, chat (plain and streamed) and analyze."""
import json
import time

import pytest

ENVELOPE = {"request_id", "instance", "model", "demo_model", "timing"}


def sse_events(response):
    frames = [f for f in response.get_data(as_text=True).split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    return [json.loads(f[len("data: "):]) for f in frames]


def check_envelope(body):
    assert ENVELOPE <= set(body)
    assert body["instance"] == "test-worker" and body["model"] == "tiny" and body["demo_model"] is True
    assert set(body["timing"]) == {"queue_ms", "compute_ms", "batch_size"}
    assert body["timing"]["compute_ms"] > 0 and body["timing"]["queue_ms"] >= 0


@pytest.mark.parametrize("text, lang, expected_lang", [
    ("很快，好吃，味道足，量大", "auto", "zh"), ("Great food, fast delivery", "auto", "en"),
    ("Great food", "zh", "zh"),
])
def test_sentiment(client, text, lang, expected_lang):
    response = client.post("/v1/sentiment", json={"text": text, "lang": lang})
    assert response.status_code == 200
    body = response.get_json()
    check_envelope(body)
    sentiment = body["sentiment"]
    assert body["lang"] == expected_lang
    assert sentiment["label"] in ("positive", "negative", "neutral")
    assert sentiment["label_zh"] == {"positive": "正面", "negative": "负面", "neutral": "中性"}[sentiment["label"]]
    assert sentiment["confidence"] == max(sentiment["scores"].values())
    assert sum(sentiment["scores"].values()) == pytest.approx(1, abs=1e-4)
    assert sentiment["level"] in ("high", "medium", "low")


def test_chat_with_text_and_with_messages(client):
    by_text = client.post("/v1/chat", json={"text": "你好", "max_tokens": 6, "temperature": 0}).get_json()
    by_messages = client.post("/v1/chat", json={"messages": [{"role": "user", "content": "你好"}],
                                                "max_tokens": 6, "temperature": 0}).get_json()
    check_envelope(by_text)
    assert by_text["reply"] == by_messages["reply"] and by_text["reply"]
    assert by_text["finish_reason"] == "length"
    usage = by_text["usage"]
    assert usage["completion_tokens"] == 6 and usage["total_tokens"] == usage["prompt_tokens"] + 6


def test_greedy_chat_is_deterministic_and_a_system_prompt_changes_it(client):
    ask = {"messages": [{"role": "user", "content": "讲个笑话"}], "max_tokens": 8, "temperature": 0}
    first, second = (client.post("/v1/chat", json=ask).get_json()["reply"] for _ in range(2))
    assert first == second
    ask["messages"].insert(0, {"role": "system", "content": "You are a pirate."})
    assert client.post("/v1/chat", json=ask).get_json()["reply"] != first


def test_streamed_chat_sends_deltas_then_a_final_event(client):
    plain = client.post("/v1/chat", json={"text": "hello", "max_tokens": 10, "temperature": 0}).get_json()
    response = client.post("/v1/chat", json={"text": "hello", "max_tokens": 10, "temperature": 0, "stream": True})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream" and response.headers["X-Accel-Buffering"] == "no"
    events = sse_events(response)
    final = events[-1]
    assert final["done"] is True and final["finish_reason"] == "length"
    check_envelope(final)
    assert "".join(e["delta"] for e in events[:-1]) == plain["reply"]
    assert final["usage"]["completion_tokens"] == 10


def test_a_streams_last_text_and_its_outcome_go_out_in_one_write(client):
    """What arrives with the final output is ready at once: one write (one chunk, one send), not one per event."""
    ask = {"max_tokens": 10, "temperature": 0, "stream": True}
    response = client.post("/v1/chat", json={"text": "hello", **ask}, buffered=False)
    writes = [chunk.decode() for chunk in response.response]
    assert all(w.count("data: ") == 1 for w in writes[:-1]), writes
    last = [json.loads(frame[len("data: "):]) for frame in writes[-1].split("\n\n") if frame]
    assert [list(event)[0] for event in last] == ["delta", "done"], writes[-1]
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                         "stream_options": {"include_usage": True}, **ask},
                           buffered=False)
    writes = [chunk.decode() for chunk in response.response]
    frames = [frame for frame in writes[-1].split("\n\n") if frame]
    assert len(frames) == 4 and frames[-1] == "data: [DONE]", writes[-1]  # text, finish, usage, [DONE]
    finish, usage = (json.loads(frame[len("data: "):]) for frame in frames[1:3])
    assert finish["choices"][0]["finish_reason"] == "length" and usage["usage"]["completion_tokens"] == 10


def test_analyze_returns_sentiment_and_a_reply(client):
    body = client.post("/v1/analyze", json={"text": "太难吃了，再也不点了", "max_tokens": 5}).get_json()
    check_envelope(body)
    assert body["sentiment"]["label"] in ("positive", "negative", "neutral")
    assert body["reply"] and body["usage"]["completion_tokens"] == 5 and body["lang"] == "zh"


def test_request_id_round_trip(client):
    response = client.post("/v1/sentiment", json={"text": "好"}, headers={"X-Request-ID": "abc-123.x"})
    assert response.headers["X-Request-ID"] == "abc-123.x" and response.get_json()["request_id"] == "abc-123.x"
    generated = client.post("/v1/sentiment", json={"text": "好"}, headers={"X-Request-ID": "bad id <script>"})
    assert len(generated.headers["X-Request-ID"]) == 32
    assert generated.get_json()["request_id"] == generated.headers["X-Request-ID"]
    error = client.post("/v1/sentiment", json={}, headers={"X-Request-ID": "err-1"})
    assert error.get_json()["error"]["request_id"] == "err-1"


def test_one_json_log_line_per_request(client, caplog):
    caplog.set_level("INFO", logger="qaio.access")
    started = time.perf_counter()
    client.post("/v1/sentiment", json={"text": "好吃"}, headers={"X-Request-ID": "log-me"})
    elapsed_ms = (time.perf_counter() - started) * 1000
    records = [r for r in caplog.records if r.name == "qaio.access" and getattr(r, "request_id", "") == "log-me"]
    assert len(records) == 1
    fields = records[0].__dict__
    assert fields["task"] == "sentiment" and fields["input_chars"] == 2 and fields["status"] == 200
    assert fields["instance"] == "test-worker" and fields["batch_size"] >= 1
    # The request's own times, inside what its client waited (a clamped or mis-scaled field is not).
    assert fields["compute_ms"] > 0 and fields["queue_ms"] + fields["compute_ms"] <= elapsed_ms


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]


def test_metrics_exposes_the_worker_series(client):
    client.post("/v1/sentiment", json={"text": "好吃"})
    client.post("/v1/chat", json={"text": "hi", "max_tokens": 2})
    text = client.get("/metrics").get_data(as_text=True)
    for name in ("flask_http_request_duration_seconds_bucket", "flask_http_request_total",
                 'qaio_queue_wait_seconds_bucket{le="0.005",task="sentiment"}',
                 'qaio_compute_seconds_count{task="chat"}', "qaio_queue_depth", 'qaio_batch_size_bucket',
                 'qaio_generated_tokens_total{task="chat"}', "qaio_prompt_tokens_total", "qaio_ready 1.0",
                 'qaio_model_info{demo_model="true",device="cpu",dtype="float32",instance="test-worker",model="tiny"}',
                 'qaio_decode_step_seconds_count{path="eager"}', "qaio_live_slots 0.0", "qaio_slots 16.0",
                 "qaio_cuda_graphs 0.0"):
        assert name in text, name
    assert "qaio_gpu_utilization_percent" not in text  # no GPU here


REVIEWS = ["很快，好吃，味道足，量大", "送餐太慢了，菜都凉了", "Great food, fast delivery", "还行吧", "难吃", "Awful."]


def test_bulk_sentiment_equals_single_calls_text_by_text_in_order(client):
    body = client.post("/v1/sentiment", json={"texts": REVIEWS}).get_json()
    check_envelope(body)
    assert body["failed"] == 0 and len(body["results"]) == len(REVIEWS)
    for text, result in zip(REVIEWS, body["results"]):
        single = client.post("/v1/sentiment", json={"text": text}).get_json()
        assert result["lang"] == single["lang"]
        assert result["sentiment"]["label"] == single["sentiment"]["label"]
        # One pass of many texts is padded otherwise than a pass of one: equal to float rounding.
        for label, score in single["sentiment"]["scores"].items():
            assert result["sentiment"]["scores"][label] == pytest.approx(score, abs=1e-4)


def test_bulk_sentiment_reports_a_text_over_the_token_limit_alone(make_app):
    client = make_app(max_prompt_tokens=200).test_client()
    body = client.post("/v1/sentiment", json={"texts": ["好吃", "龘" * 400, "难吃"]}).get_json()
    assert body["failed"] == 1
    assert [("error" in r) for r in body["results"]] == [False, True, False]
    assert body["results"][1]["error"]["code"] == "prompt_too_long" and body["results"][1]["error"]["status"] == 413
    everything_too_long = client.post("/v1/sentiment", json={"texts": ["龘" * 400]})
    assert everything_too_long.status_code == 413


def test_a_bulk_request_late_on_arrival_is_refused_and_counted_text_by_text(app, client):
    def late() -> float:
        return app.extensions["qaio"].metrics.registry.get_sample_value(
            "qaio_rejections_total", {"reason": "deadline_on_arrival"}) or 0.0

    before = late()
    # Received by the front door 2 s ago with a 1.5 s budget: late already, none of its texts computed.
    stamp = {"X-Request-Start": f"t={time.time() - 2:.3f}"}
    answer = client.post("/v1/sentiment", json={"texts": ["好吃", "难吃", "一般"], "deadline_ms": 1500}, headers=stamp)
    assert answer.status_code == 504 and answer.get_json()["error"]["code"] == "deadline_exceeded"
    assert late() == before + 3


def test_streamed_analyze_sends_the_sentiment_first_then_the_reply(client):
    plain = client.post("/v1/analyze", json={"text": "太难吃了，再也不点了", "max_tokens": 8, "temperature": 0}).get_json()
    response = client.post("/v1/analyze", json={"text": "太难吃了，再也不点了", "max_tokens": 8, "temperature": 0,
                                                "stream": True})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = sse_events(response)
    assert events[0]["sentiment"] == plain["sentiment"] and events[0]["lang"] == "zh"
    assert "".join(e["delta"] for e in events[1:-1]) == plain["reply"]
    assert events[-1]["done"] is True and events[-1]["usage"]["completion_tokens"] == 8


def test_chat_takes_the_openai_parameters_too(client):
    base = {"text": "hello", "max_tokens": 12, "temperature": 1.0, "seed": 99}
    first = client.post("/v1/chat", json=base).get_json()
    assert client.post("/v1/chat", json=base).get_json()["reply"] == first["reply"]
    several = client.post("/v1/chat", json={**base, "n": 2, "logprobs": True, "top_logprobs": 1}).get_json()
    assert several["reply"] == first["reply"] and len(several["choices"]) == 2
    assert all(len(c["logprobs"]) == 12 and len(c["logprobs"][0]["top_logprobs"]) == 1 for c in several["choices"])
    greedy = client.post("/v1/chat", json={"text": "hello", "max_tokens": 12, "temperature": 0}).get_json()["reply"]
    stop = greedy[4:6]
    cut = client.post("/v1/chat", json={"text": "hello", "max_tokens": 12, "temperature": 0, "stop": stop}).get_json()
    assert cut["reply"] == greedy[:greedy.index(stop)] and cut["finish_reason"] == "stop"
