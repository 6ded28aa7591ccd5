"""Upstream strategies with real workers: weights, stickiness, least connections."""
import concurrent.futures
import http.client
import json
import time
import uuid
from collections import Counter

import requests

from qaio_testing import SHARED_CPU_WORKER_ENV, served_by


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


def conversation_home(url: str, key: str, turns: int = 3, **headers) -> set[str]:
    """The workers that answered a named conversation's turns (new texts: no cache hits)."""
    named = {"X-Conversation-Id": key, **headers}
    return {served_by(sentiment(url, f"{key} 第{turn}轮 {uuid.uuid4()}", headers=named).headers)
            for turn in range(turns)}


UNLIMITED = {"QAIO_NGINX_SENTIMENT_RATE": "1000r/s", "QAIO_NGINX_SENTIMENT_BURST": "1000"}  # many turns at once


def test_a_named_conversation_stays_on_its_worker_and_conversations_spread_over_both(workers, nginx):
    proxy = nginx(workers, **UNLIMITED)
    homes = {}
    for n in range(24):  # all 24 on one worker of two by chance: 1 in 8 million
        seen = conversation_home(proxy.url, f"conv-{n}")
        assert len(seen) == 1, f"conv-{n} moved between workers: {seen}"
        homes[f"conv-{n}"] = seen.pop()
    assert set(homes.values()) == {w.address for w in workers}, homes
    # Every endpoint routes by it: an OpenAI client's turn (extra_headers) goes home too.
    for key in ("conv-0", "conv-1"):
        turn = {"messages": [{"role": "user", "content": f"{key} 你好 {uuid.uuid4()}"}], "max_tokens": 1}
        response = requests.post(proxy.url + "/v1/chat/completions", json=turn, headers={"X-Conversation-Id": key},
                                 timeout=30)
        assert response.status_code == 200 and served_by(response.headers) == homes[key], (key, response.text)


def test_a_conversation_whose_worker_is_drained_goes_to_the_other_and_comes_back(gunicorn_server, nginx):
    token = "affinity-admin-token-0123456789"
    pair = [gunicorn_server(QAIO_ADMIN_TOKEN=token, **SHARED_CPU_WORKER_ENV) for _ in range(2)]
    proxy = nginx(pair, **UNLIMITED)
    (home,) = conversation_home(proxy.url, "conv-drain")
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.post(f"http://{home}/admin/drain", headers=auth, timeout=30).status_code == 200
    try:
        away = conversation_home(proxy.url, "conv-drain")
        assert away and home not in away, away  # every turn answered (200) by the other worker
    finally:
        assert requests.post(f"http://{home}/admin/undrain", headers=auth, timeout=30).status_code == 200
    assert conversation_home(proxy.url, "conv-drain") == {home}


def long_stream(url: str, key: str) -> requests.Response:
    """A conversation turn that holds its worker until closed (its workers sleep after every step)."""
    response = requests.post(url + "/v1/chat", json={"text": "a long story", "max_tokens": 1000, "stream": True,
                                                     "deadline_ms": 120000},
                             headers={"X-Conversation-Id": key}, stream=True, timeout=60)
    assert response.status_code == 200, response.text
    return response


def test_conversation_turns_past_a_workers_share_walk_the_ring_then_go_by_load(gunicorn_server, nginx):
    slow = {"QAIO_STEP_DELAY_MS": "50", **SHARED_CPU_WORKER_ENV}  # a 1000-token stream holds its slot ~50 s
    pair = [gunicorn_server(**slow) for _ in range(2)]
    proxy = nginx(pair, QAIO_NGINX_AFFINITY_CONNS="1", **UNLIMITED)
    (home,) = conversation_home(proxy.url, "conv-full", turns=2)
    held = [long_stream(proxy.url, "conv-full")]
    try:
        assert served_by(held[0].headers) == home
        held.append(long_stream(proxy.url, "conv-full"))  # home holds its one turn: the ring walks on
        (other,) = {w.address for w in pair} - {home}
        assert served_by(held[1].headers) == other
        # Both hold their share of the ring: the next turn goes by load, answered, not refused.
        response = sentiment(proxy.url, f"第三轮 {uuid.uuid4()}", headers={"X-Conversation-Id": "conv-full"})
        assert response.status_code == 200 and served_by(response.headers) in (home, other), response.text
        assert response.headers["X-Served-By"].startswith("qaio_conversations : "), response.headers  # the ring had none
    finally:
        for stream in held:
            stream.close()


def test_a_conversation_whose_worker_is_down_goes_to_the_other(gunicorn_server, nginx):
    pair = [gunicorn_server(**SHARED_CPU_WORKER_ENV) for _ in range(2)]
    proxy = nginx(pair, **UNLIMITED)
    (home,) = conversation_home(proxy.url, "conv-down")
    next(w for w in pair if w.address == home).kill()
    (other,) = {w.address for w in pair} - {home}
    assert conversation_home(proxy.url, "conv-down") == {other}  # every turn answered (200) there


def closed_loop(url: str, total: int, clients: int) -> list[tuple[str, float]]:
    """`total` short chats sent by `clients` clients, each sending its next when its last is answered:
    (worker, seconds) of each."""
    def one(i: int) -> tuple[str, float]:
        started = time.monotonic()
        response = requests.post(url + "/v1/chat", json={"text": f"你好 {i} {uuid.uuid4()}", "max_tokens": 4},
                                 timeout=120)
        assert response.status_code == 200, response.text
        return served_by(response.headers), time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(total)))


def test_a_slow_worker_gets_a_smaller_share_by_least_conn_than_by_round_robin(gunicorn_server, nginx):
    """A worker that sleeps 200 ms after every step stands for a throttled one: least_conn keeps as many
    requests open on each, so it answers fewer of them; round robin gives it every other one."""
    fast = gunicorn_server(**SHARED_CPU_WORKER_ENV)
    slow = gunicorn_server(QAIO_STEP_DELAY_MS="200", **SHARED_CPU_WORKER_ENV)
    chats = {"QAIO_NGINX_CHAT_RATE": "1000r/s", "QAIO_NGINX_CHAT_BURST": "1000"}
    share = {}
    for strategy in ("least_conn", "round_robin"):
        proxy = nginx([fast, slow], QAIO_NGINX_STRATEGY=strategy, **chats)
        served = Counter(worker for worker, _ in closed_loop(proxy.url, total=60, clients=4))
        share[strategy] = served[slow.address] / 60
    assert 0.4 <= share["round_robin"] <= 0.6 and share["least_conn"] <= 0.3, share
