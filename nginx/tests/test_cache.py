"""Caching of deterministic answers only, keyed on the body, and unbuffered streams."""
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from qaio_testing import SHARED_CPU_WORKER_ENV, eventually


@pytest.fixture()
def proxy(workers, nginx):
    return nginx(workers, QAIO_NGINX_SENTIMENT_RATE="1000r/s", QAIO_NGINX_CHAT_RATE="1000r/s")


def post(proxy, path, body):
    return requests.post(proxy.url + path, json=body, timeout=60)


def test_same_sentiment_twice_is_a_miss_then_a_hit_with_the_same_body(proxy):
    first, second = (post(proxy, "/v1/sentiment", {"text": "缓存测试，味道不错"}) for _ in range(2))
    assert (first.headers["X-Cache-Status"], second.headers["X-Cache-Status"]) == ("MISS", "HIT")
    assert first.content == second.content
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]  # the edge's id is per request
    assert post(proxy, "/v1/sentiment", {"text": "缓存测试，味道很差"}).headers["X-Cache-Status"] == "MISS"


def test_greedy_chat_is_cached_sampled_chat_never(proxy):
    greedy = {"text": "cache me", "max_tokens": 4, "temperature": 0}
    assert [post(proxy, "/v1/chat", greedy).headers["X-Cache-Status"] for _ in range(2)] == ["MISS", "HIT"]
    sampled = {"text": "never cache me", "max_tokens": 4, "temperature": 0.8}
    statuses = [post(proxy, "/v1/chat", sampled).headers.get("X-Cache-Status") for _ in range(3)]
    assert "HIT" not in statuses
    default_temperature = {"text": "no temperature given", "max_tokens": 4}  # the default 0.7 samples
    assert "HIT" not in [post(proxy, "/v1/chat", default_temperature).headers.get("X-Cache-Status") for _ in range(2)]


def test_the_worker_decides_errors_are_never_cached(proxy):
    bad = {"text": "x", "temperature": 0, "top_p": 0}
    responses = [post(proxy, "/v1/chat", bad) for _ in range(2)]
    assert [r.status_code for r in responses] == [400, 400]
    assert "HIT" not in [r.headers.get("X-Cache-Status") for r in responses]


def test_a_burst_of_identical_requests_computes_once(proxy, workers):
    body = {"text": f"同时到达的相同请求 {time.time()}"}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(proxy, "/v1/sentiment", body), range(6)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert [r.headers["X-Cache-Status"] for r in responses].count("MISS") == 1


def generated_chat_tokens(workers) -> float:
    total = 0.0
    for worker in workers:
        text = requests.get(worker.url + "/metrics", timeout=10).text
        match = re.search(r'^qaio_generated_tokens_total\{task="chat"\} (\S+)$', text, re.M)
        total += float(match.group(1)) if match else 0.0
    return total


def test_streams_pass_unbuffered_and_a_client_leaving_stops_generation(proxy, workers):
    """The first event reaches the client while the model is still generating: leaving then stops it early."""
    before = generated_chat_tokens(workers)
    stream = requests.post(proxy.url + "/v1/chat", json={"text": "a very long story", "max_tokens": 1000,
                                                         "temperature": 0, "stream": True}, stream=True, timeout=60)
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    first = next(line for line in stream.iter_lines(decode_unicode=True) if line)
    assert "delta" in json.loads(first[len("data: "):])
    stream.close()
    # A row's tokens are counted once, as it ends.
    produced = eventually(lambda: generated_chat_tokens(workers) - before, what="the stopped row's tokens counted")
    assert 0 < produced < 1000, produced


def test_a_cached_answer_always_comes_from_the_model_being_served(tiny_model_dir, stand_in_model_dir,
                                                                   gunicorn_server, nginx):
    """Switch the model behind a running cache (same cache directory), as `make stop` + `make run
    QAIO_MODEL=...` or a rollout does: the new model's answer, never the old one's."""
    body = {"text": "换了模型以后还是这条评论"}
    tiny = gunicorn_server(**SHARED_CPU_WORKER_ENV)
    front = nginx([tiny])
    cache = front.prefix + "/cache"  # the next front doors reuse the first one's cache directory
    first, again = post(front, "/v1/sentiment", body), post(front, "/v1/sentiment", body)
    assert (first.headers["X-Cache-Status"], again.headers["X-Cache-Status"]) == ("MISS", "HIT")
    assert again.json()["model"] == "tiny"
    front.stop()
    tiny.stop()

    smol = gunicorn_server(model=stand_in_model_dir, **SHARED_CPU_WORKER_ENV)
    switched = nginx([smol], QAIO_NGINX_CACHE_DIR=cache)
    answer = post(switched, "/v1/sentiment", body)
    assert answer.headers["X-Cache-Status"] == "MISS" and answer.json()["model"] == "smollm2-135m-instruct"
    assert post(switched, "/v1/sentiment", body).headers["X-Cache-Status"] == "HIT"

    # A worker that serves another model than the front door names (a fallback, a rollout midway)
    # answers, but its answer is never stored under that model's key.
    stale_front = nginx([smol], QAIO_NGINX_CACHE_DIR=cache, QAIO_MODEL=tiny_model_dir)
    other = {"text": "只在这个前门问过的评论"}
    statuses = [post(stale_front, "/v1/sentiment", other).headers["X-Cache-Status"] for _ in range(2)]
    assert statuses == ["MISS", "MISS"]


def raw_post(proxy, path: str, body: bytes, chunked: bool = False) -> tuple[int, str | None, bytes]:
    """A POST as bytes (fixed length or chunked): status, X-Cache-Status, body."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    try:
        if chunked:
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for start in range(0, len(body), 4096):
                piece = body[start:start + 4096]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("X-Cache-Status"), response.read()
    finally:
        conn.close()


def padded(body: dict, size: int) -> bytes:
    """`body` as JSON of exactly `size` bytes (insignificant whitespace before the closing brace)."""
    text = json.dumps(body, ensure_ascii=False).encode()
    return text[:-1] + b" " * (size - len(text)) + b"}"


@pytest.mark.parametrize("size", [4 * 1024, 16 * 1024, 60 * 1024])
@pytest.mark.parametrize("path, body", [("/v1/sentiment", {"text": "很长的请求体"}),
                                        ("/v1/chat", {"text": "很长的请求体", "max_tokens": 2, "temperature": 0})],
                         ids=["sentiment", "greedy chat"])
def test_a_large_body_is_cached_like_a_small_one(proxy, path, body, size):
    """The key holds the whole body at any accepted size (it used to overflow nginx's 4 KB header buffer
    past ~3.8 KB, and such bodies were silently never cached)."""
    data = padded({**body, "text": f"{body['text']} {size} {time.time()}"}, size)
    first, second = raw_post(proxy, path, data), raw_post(proxy, path, data)
    assert (first[0], second[0]) == (200, 200)
    assert (first[1], second[1]) == ("MISS", "HIT") and first[2] == second[2]
    assert raw_post(proxy, path, data, chunked=True)[1] == "HIT"  # the same body, sent chunked
    assert "not enough for cache key" not in (Path(proxy.prefix) / "logs" / "error.log").read_text()


def test_a_body_outside_the_key_never_touches_the_cache(workers, nginx):
    """A body nginx keeps in a file (past QAIO_NGINX_BODY_BUFFER here; a chunked body can land there too)
    is not in $request_body, so not in the key: it is never stored, never served from the cache, and it
    never answers for another body, such as an empty one that must get its 400."""
    proxy = nginx(workers, QAIO_NGINX_BODY_BUFFER="1k", QAIO_NGINX_SENTIMENT_RATE="1000r/s")
    big = padded({"text": "放在文件里的请求体"}, 4096)
    statuses = [raw_post(proxy, "/v1/sentiment", big, chunked=chunked) for chunked in (False, True, False)]
    assert [s[0] for s in statuses] == [200, 200, 200] and "HIT" not in [s[1] for s in statuses]
    for empty in (b"", b"{}"):
        status, _, answer = raw_post(proxy, "/v1/sentiment", empty)
        assert status == 400 and json.loads(answer)["error"]["code"] in ("invalid_json", "invalid_request")
    small = padded({"text": "内存里的请求体"}, 512)
    assert [raw_post(proxy, "/v1/sentiment", small)[1] for _ in range(2)] == ["MISS", "HIT"]
