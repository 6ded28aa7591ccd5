"""API keys at the front door (QAIO_API_KEYS_FILE): a missing, wrong or revoked key is a JSON 401 that
no worker sees; limits are per key; usage is counted per key name; the OpenAI SDK's api_key= works."""
import json
import select
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from qaio_testing import API_KEY_SCRIPT, add_api_key, eventually, metric


def chat(proxy, key: str | None, text: str = "你好", **extra):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return requests.post(proxy.url + "/v1/chat", json={"text": text, "max_tokens": 2, **extra}, headers=headers,
                         timeout=60)


def assert_unauthorized(proxy, response):
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["request_id"] == response.headers["X-Request-ID"]
    entry = proxy.log_entries(error["request_id"])[0]
    assert entry["status"] == 401 and entry["upstream"] == ""  # no worker was reached
    return error


def test_no_key_a_wrong_key_and_a_revoked_key_get_json_401_before_any_worker(workers, nginx, api_keys_file):
    alice = add_api_key(api_keys_file, "alice")
    proxy = nginx(workers, QAIO_API_KEYS_FILE=str(api_keys_file))
    assert "Authorization: Bearer" in assert_unauthorized(proxy, chat(proxy, None))["message"]
    assert "not valid" in assert_unauthorized(proxy, chat(proxy, alice + "x"))["message"]
    assert_unauthorized(proxy, requests.get(proxy.url + "/v1/models", timeout=30))
    served = chat(proxy, alice)
    assert served.status_code == 200 and proxy.log_entries(served.headers["X-Request-ID"])[0]["key"] == "alice"

    subprocess.run([str(API_KEY_SCRIPT), "revoke", str(api_keys_file), "alice"], check=True)  # no restart, no reload
    assert_unauthorized(proxy, chat(proxy, alice))


def test_a_key_added_while_running_is_served_at_once(workers, nginx, api_keys_file):
    add_api_key(api_keys_file, "first")
    proxy = nginx(workers, QAIO_API_KEYS_FILE=str(api_keys_file))
    later = add_api_key(api_keys_file, "later")
    assert chat(proxy, later).status_code == 200


def test_a_key_over_its_rate_gets_429_naming_the_limit_while_another_key_is_served(workers, nginx, api_keys_file):
    # One request a minute: however slowly this machine sends them, exactly 1 + burst (2) pass.
    slow = add_api_key(api_keys_file, "slow", "rate=1r/m")
    other = add_api_key(api_keys_file, "other")
    proxy = nginx(workers, QAIO_API_KEYS_FILE=str(api_keys_file), QAIO_NGINX_RETRY_AFTER_S="3")
    statuses = [chat(proxy, slow, f"第 {i} 次").status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    limited = chat(proxy, slow)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
    error = limited.json()["error"]
    assert error["code"] == "rate_limited" and error["limit"] == "request rate" and "'slow'" in error["message"]
    assert [chat(proxy, other, f"别的 {i}").status_code for i in range(5)] == [200] * 5


def test_a_key_cannot_hold_more_requests_at_once_than_its_conn(workers, nginx, api_keys_file):
    one = add_api_key(api_keys_file, "one-at-a-time", "conn=1")
    other = add_api_key(api_keys_file, "other")
    proxy = nginx(workers, QAIO_API_KEYS_FILE=str(api_keys_file))
    # A request whose body is still coming holds its connection: nginx counts it once it has read the
    # headers. nginx may read them after a probe took the slot (another nginx worker process): the held
    # request is then refused, and is sent again until it holds the slot and the probe is refused.
    body = json.dumps({"text": "慢慢发", "max_tokens": 1}).encode()

    def hold() -> socket.socket:
        held = socket.create_connection(("127.0.0.1", proxy.port))
        held.sendall(f"POST /v1/chat HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {one}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        return held

    held = [hold()]

    def probe_refused():
        if select.select(held, [], [], 0)[0]:  # the held request was answered (refused): hold again
            held[0].close()
            held[0] = hold()
        response = chat(proxy, one)
        return response.json()["error"] if response.status_code == 429 else None

    try:
        error = eventually(probe_refused, what="the key's second request refused while its first holds the one slot")
        assert error["limit"] == "concurrent requests" and "'one-at-a-time'" in error["message"]
        assert chat(proxy, other).status_code == 200
        held[0].sendall(body[5:])
        assert held[0].recv(64).startswith(b"HTTP/1.1 200")
    finally:
        held[0].close()
    eventually(lambda: chat(proxy, one).status_code == 200, what="the key's slot back after its request ended")


def test_wrong_keys_are_rate_limited_per_address(workers, nginx, api_keys_file):
    add_api_key(api_keys_file, "alice")
    proxy = nginx(workers, QAIO_API_KEYS_FILE=str(api_keys_file))
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: chat(proxy, f"guess-{i}").status_code, range(40)))
    assert set(statuses) == {401, 429} and statuses.count(401) <= 21  # burst 20 at 2 r/s


def test_usage_counters_move_by_the_tokens_served_under_the_key_name(workers, nginx, api_keys_file):
    key = add_api_key(api_keys_file, "metered")
    proxy = nginx(workers, QAIO_API_KEYS_FILE=str(api_keys_file))

    def totals():
        return [sum(metric(w, name, labels) for w in workers) for name, labels in (
            ("qaio_key_requests_total", '{key="metered"}'),
            ("qaio_key_tokens_total", '{key="metered",kind="prompt"}'),
            ("qaio_key_tokens_total", '{key="metered",kind="completion"}'))]

    before = totals()
    usage = chat(proxy, key, max_tokens=5).json()["usage"]
    expected = [before[0] + 1, before[1] + usage["prompt_tokens"], before[2] + usage["completion_tokens"]]
    eventually(lambda: totals() == expected, what=f"per-key usage {expected}")


def test_the_openai_sdk_works_with_api_key(workers, nginx, api_keys_file):
    key = add_api_key(api_keys_file, "sdk")
    proxy = nginx(workers, QAIO_API_KEYS_FILE=str(api_keys_file))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert [m.id for m in client.models.list().data]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_without_api_keys_file_no_key_is_needed_and_limits_name_the_address(workers, nginx):
    proxy = nginx(workers, QAIO_NGINX_CHAT_RATE="1r/m", QAIO_NGINX_CHAT_BURST="1")
    assert [chat(proxy, None).status_code for _ in range(2)] == [200, 200]
    limited = chat(proxy, None)
    assert limited.status_code == 429 and "this address" in limited.json()["error"]["message"]
