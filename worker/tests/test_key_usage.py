"""Usage per API key: the name the front door sends (X-Qaio-Key) counts requests and tokens, streams
when they end; no name, or one nginx would never send, counts nothing."""
import json
import logging

import pytest

from qwen_worker.api import usage


def value(app, name: str, **labels) -> float:
    return app.extensions["qaio"].metrics.registry.get_sample_value(name, labels) or 0.0


def post(client, path: str, body: dict, key: str | None = None):
    """A finished request: its response closed, as a server closes it after the last byte."""
    response = client.post(path, json=body, headers={} if key is None else {"X-Qaio-Key": key})
    response.get_data()
    response.close()
    return response


def counts(app, key: str) -> tuple[float, float, float]:
    return (value(app, "qaio_key_requests_total", key=key),
            value(app, "qaio_key_tokens_total", key=key, kind="prompt"),
            value(app, "qaio_key_tokens_total", key=key, kind="completion"))


def test_a_keys_chat_counts_its_request_and_the_tokens_its_usage_reports(app, client):
    before = counts(app, "alice")
    body = post(client, "/v1/chat", {"text": "你好", "max_tokens": 4}, "alice").get_json()
    after = counts(app, "alice")
    assert after[0] - before[0] == 1
    assert after[1] - before[1] == body["usage"]["prompt_tokens"] > 0
    assert after[2] - before[2] == body["usage"]["completion_tokens"] > 0


def test_a_stream_counts_when_it_ends(app, client):
    before = counts(app, "stream-key")
    response = client.post("/v1/chat/completions", headers={"X-Qaio-Key": "stream-key"},
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
                                 "stream_options": {"include_usage": True}})
    frames = [line for line in response.get_data(as_text=True).splitlines() if line.startswith("data: {")]
    assert counts(app, "stream-key") == before  # not yet: the stream is still open
    response.close()
    reported = json.loads(frames[-1][6:])["usage"]
    after = counts(app, "stream-key")
    assert after[0] - before[0] == 1 and after[2] - before[2] == reported["completion_tokens"] == 3
    assert after[1] - before[1] == reported["prompt_tokens"]


def test_bulk_sentiment_counts_every_texts_prompt(app, client):
    before = counts(app, "bulk")
    texts = ["好吃", "太难吃了，再也不来", "送餐很快"]
    singles = []
    for text in texts:
        before_one = counts(app, "single")
        assert post(client, "/v1/sentiment", {"text": text}, "single").status_code == 200
        singles.append(counts(app, "single")[1] - before_one[1])
    assert post(client, "/v1/sentiment", {"texts": texts}, "bulk").status_code == 200
    after = counts(app, "bulk")
    assert after[0] - before[0] == 1 and after[2] == before[2] == 0
    assert after[1] - before[1] == sum(singles) and min(singles) > 0  # each text's prompt, as if sent alone


@pytest.mark.parametrize("header", [None, "", "two words", "x" * 65, "名字"])
def test_no_key_name_or_one_nginx_never_sends_counts_nothing(app, client, header):
    before = value(app, "qaio_key_requests_total", key=header or "")
    assert post(client, "/v1/chat", {"text": "hi", "max_tokens": 1}, header).status_code == 200
    assert value(app, "qaio_key_requests_total", key=header or "") == before == 0


def test_the_access_log_names_the_key(client, caplog):
    with caplog.at_level(logging.INFO, logger="qaio.access"):
        post(client, "/v1/chat", {"text": "hi", "max_tokens": 1}, "logged")
    assert [r.key for r in caplog.records if r.name == "qaio.access"] == ["logged"]


def test_key_names_past_the_bound_count_as_other(app, client, monkeypatch):
    monkeypatch.setattr(usage, "MAX_KEY_NAMES", 0)
    before = value(app, "qaio_key_requests_total", key="_other")
    post(client, "/v1/chat", {"text": "hi", "max_tokens": 1}, "one-too-many")
    assert value(app, "qaio_key_requests_total", key="_other") == before + 1
    assert value(app, "qaio_key_requests_total", key="one-too-many") == 0
