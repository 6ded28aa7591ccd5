"""Upstream strategies with real workers: weights, stickiness, least connections."""
import http.client
import json
from collections import Counter

import requests

from qaio_testing import served_by


def sentiment(url, text, **kw):
    return requests.post(url + "/v1/sentiment", json={"text": text}, timeout=30, **kw)


def test_weights_1_to_3_split_traffic_about_1_to_3(workers, nginx):
    proxy = nginx(workers, QAIO_NGINX_STRATEGY="round_robin", QAIO_NGINX_WEIGHTS="1,3")
    counts = Counter(served_by(sentiment(proxy.url, f"评论 {i}").headers) for i in range(40))  # distinct: no cache hits
    assert 8 <= counts[workers[0].address] <= 12 and 28 <= counts[workers[1].address] <= 32, counts


def test_ip_hash_keeps_each_client_on_one_worker(workers, nginx):
    proxy = nginx(workers, QAIO_NGINX_STRATEGY="ip_hash")
    placements = {}
    for client in range(1, 9):  # ip_hash keys on the first three octets: one /24 per client
        source = f"127.0.{client}.1"
        seen = set()
        for i in range(5):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30, source_address=(source, 0))
            conn.request("POST", "/v1/sentiment", json.dumps({"text": f"{source} 第{i}次"}),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200
            seen.add(response.getheader("X-Served-By"))
            conn.close()
        assert len(seen) == 1, f"{source} moved between workers: {seen}"
        placements[source] = seen.pop()
    assert set(placements.values()) == {w.address for w in workers}, "clients should spread over both workers"


def test_least_conn_sends_new_requests_away_from_a_worker_busy_with_a_long_one(workers, nginx):
    proxy = nginx(workers)  # least_conn is the default
    long_one = requests.post(proxy.url + "/v1/chat", json={"text": "a long story", "max_tokens": 1000,
                                                           "stream": True, "deadline_ms": 30000},
                             stream=True, timeout=60)
    busy = served_by(long_one.headers)
    try:
        others = Counter(served_by(sentiment(proxy.url, f"短评 {i}").headers) for i in range(10))
    finally:
        long_one.close()
    assert busy not in others and sum(others.values()) == 10, (busy, others)
