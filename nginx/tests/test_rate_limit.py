"""Per-client rate limits: a burst over the limit gets JSON 429s with Retry-After; paced traffic never does."""
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def test_within_the_limit_nothing_is_rejected(workers, nginx):
    proxy = nginx(workers, QAIO_NGINX_SENTIMENT_RATE="2r/s", QAIO_NGINX_SENTIMENT_BURST="2")
    statuses = []
    for i in range(6):
        statuses.append(requests.post(proxy.url + "/v1/sentiment", json={"text": f"慢慢来 {i}"}, timeout=30).status_code)
        time.sleep(0.7)  # slower than 2 r/s
    assert statuses == [200] * 6


def test_a_burst_over_the_limit_gets_json_429_with_retry_after(workers, nginx):
    # One request a minute: however slowly this machine fires the burst, exactly 1 + burst pass.
    proxy = nginx(workers, QAIO_NGINX_SENTIMENT_RATE="1r/m", QAIO_NGINX_SENTIMENT_BURST="2",
                  QAIO_NGINX_RETRY_AFTER_S="2")
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda i: requests.post(proxy.url + "/v1/sentiment", json={"text": f"冲 {i}"},
                                                          headers={"X-Request-ID": f"burst-{i}"}, timeout=30),
                                  range(12)))
    limited = [r for r in responses if r.status_code == 429]
    assert len(limited) == 9 and all(r.status_code in (200, 429) for r in responses)  # 1 + burst 2 pass
    for response in limited:
        assert response.headers["Retry-After"] == "2"
        error = response.json()["error"]
        assert error["code"] == "rate_limited" and error["request_id"] == response.headers["X-Request-ID"]
        assert error["request_id"].startswith("burst-")


def test_chat_has_its_own_limit(workers, nginx):
    proxy = nginx(workers, QAIO_NGINX_SENTIMENT_RATE="1r/m", QAIO_NGINX_SENTIMENT_BURST="1",
                  QAIO_NGINX_CHAT_RATE="50r/s", QAIO_NGINX_CHAT_BURST="20")
    sentiment = [requests.post(proxy.url + "/v1/sentiment", json={"text": f"情感 {i}"}, timeout=30).status_code
                 for i in range(3)]
    chat = [requests.post(proxy.url + "/v1/chat", json={"text": f"聊天 {i}", "max_tokens": 1}, timeout=30).status_code
            for i in range(3)]
    assert 429 in sentiment and chat == [200] * 3
