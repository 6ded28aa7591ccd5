"""A hostile or careless client through the real front door: what it sends never fails a worker, its
headers get the JSON 400 contract, and one address cannot hold the slots every other client needs."""
import http.client
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from qaio_testing import SHARED_CPU_WORKER_ENV

# Legal in characters (3,000 < QAIO_MAX_INPUT_CHARS), 6,000-7,000 tokens: past the model's position
# table (5,120). Classes of character that each tokenize to two or more byte tokens: astral CJK, emoji,
# rare BMP CJK, rare scripts, symbols.
MANY_TOKENS = {"astral CJK": "𠀀𪚥𠮷" * 1000, "emoji": "🧪🦜🫠" * 1000, "rare CJK": "龘" * 3000,
               "rare script": "ꙮ" * 3000, "musical symbols": "\U0001D11E" * 3000}


def failures(worker) -> float:
    text = requests.get(worker.url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^qaio_model_failures_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.fixture()
def proxy(workers, nginx):
    return nginx(workers, QAIO_NGINX_SENTIMENT_RATE="1000r/s", QAIO_NGINX_CHAT_RATE="1000r/s",
                 QAIO_NGINX_SENTIMENT_BURST="100", QAIO_NGINX_CHAT_BURST="100")


def test_texts_past_the_token_limit_never_fail_a_worker(proxy, workers):
    """Each such text is refused (413, not retried on the other worker), the texts sent with it are
    answered, and both workers stay ready with no failure counted."""
    before = [failures(w) for w in workers]
    bodies = [("/v1/sentiment", {"text": text}) for text in MANY_TOKENS.values()] * 2
    bodies += [("/v1/analyze", {"text": text, "max_tokens": 2}) for text in MANY_TOKENS.values()]
    innocent = [("/v1/sentiment", {"text": f"送餐很快，味道不错 {i}"}) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda pb: requests.post(proxy.url + pb[0], json=pb[1], timeout=60),
                                  bodies + innocent))
    hostile, fine = responses[:len(bodies)], responses[len(bodies):]
    for response in hostile:
        assert response.status_code == 413, response.text[:200]
        assert response.json()["error"]["code"] == "prompt_too_long"
        assert "," not in response.headers["X-Served-By"]  # a 413 is the client's: never tried on another worker
    assert [r.status_code for r in fine] == [200] * len(fine)
    for worker, count in zip(workers, before):
        assert requests.get(worker.url + "/readyz", timeout=10).status_code == 200
        assert failures(worker) == count


BAD_HEADER_VALUES = {
    "superscript digits": "²³", "Arabic-Indic digits": "١٢٣", "5,000 digits": "9" * 5000,
    "exponent": "1e3", "negative": "-1", "zero": "0", "hex": "0x10", "plus sign": "+5", "fraction": "1.5",
    "text": "soon", "Latin-1 byte": "5\xb5",
}


HEADER_CASES = [("/v1/sentiment", {"text": "头"}, value) for value in BAD_HEADER_VALUES.values()] + [
    ("/v1/chat", {"text": "头", "max_tokens": 1}, "²"),
    ("/v1/analyze", {"text": "头", "max_tokens": 1}, "9" * 5000),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "头"}], "max_tokens": 1}, "١٢٣")]


@pytest.mark.parametrize("path, body, value", HEADER_CASES,
                         ids=[f"sentiment {name}" for name in BAD_HEADER_VALUES] + ["chat", "analyze", "openai"])
def test_a_malformed_deadline_header_is_a_json_400(proxy, path, body, value):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        # Bytes as a client sends them: Latin-1 where they fit (as HTTP defines), else UTF-8.
        conn.putheader("X-Deadline-Ms", value.encode("latin-1") if max(map(ord, value)) < 256 else value.encode())
        payload = json.dumps(body).encode()
        conn.putheader("Content-Length", str(len(payload)))
        conn.endheaders(payload)
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 400 and answer["error"]["code"] == "invalid_header", answer
    assert "X-Deadline-Ms" in answer["error"]["message"]


def stream_from(port: int, address: str, forwarded_for: str | None):
    """A long sampled chat stream from one client: (status, the open connection) once it holds a slot
    (its headers come with its first event), or its refusal."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(address, 0))
    headers = {"Content-Type": "application/json"}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    conn.request("POST", "/v1/chat", json.dumps({"text": "讲一个很长的故事", "max_tokens": 1000,
                                                "stream": True}), headers)
    response = conn.getresponse()
    if response.status != 200:
        response.read()
    return response.status, conn


CLIENTS = {
    # (nginx settings, the flooding client, the other client): (source address, X-Forwarded-For)
    "by connection address": ({}, ("127.0.0.1", None), ("127.0.0.2", None)),
    "behind a proxy (real IP)": ({"QAIO_NGINX_REAL_IP_FROM": "127.0.0.0/8"}, ("127.0.0.1", "198.51.100.7"),
                                 ("127.0.0.1", "198.51.100.8")),
}


@pytest.mark.parametrize("settings, flooder, other", CLIENTS.values(), ids=CLIENTS.keys())
def test_one_address_cannot_hold_every_slot(gunicorn_server, nginx, settings, flooder, other):
    """A worker holding 4 requests (3 slots + 1 queued) behind a front door that lets one address hold 2:
    six long streams from one client get 2 admitted and 4 refused with 429, and a second client is
    still served. Without the cap the flood took all 4 and the second client got 503."""
    capacity = {"QAIO_MAX_BATCH_SIZE": "3", "QAIO_QUEUE_CAPACITY": "1"}
    worker = gunicorn_server(**SHARED_CPU_WORKER_ENV, **capacity)
    proxy = nginx([worker], QAIO_NGINX_CONN_PER_CLIENT="2", QAIO_NGINX_CHAT_RATE="1000r/s", **capacity, **settings)
    with ThreadPoolExecutor(6) as pool:
        flood = list(pool.map(lambda _: stream_from(proxy.port, *flooder), range(6)))
    try:
        assert sorted(status for status, _ in flood) == [200, 200, 429, 429, 429, 429]
        status, conn = stream_from(proxy.port, *other)  # in the slot the flood could not take
        conn.close()
        assert status == 200
    finally:
        for _, conn in flood:
            conn.close()  # the worker stops generating for them
