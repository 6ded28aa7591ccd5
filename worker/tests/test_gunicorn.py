"""A real gunicorn process started with the project's gunicorn.conf.py, spoken to over HTTP."""
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from qaio_testing import GunicornServer, eventually


def test_openai_sdk_works_unchanged(gunicorn_server):
    server = gunicorn_server()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]

    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=7, temperature=0)
    reply = completion.choices[0].message.content
    assert reply and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 7

    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=7, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 7

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=3)
    assert "messages" in str(err.value)


def test_request_id_and_sse_over_a_real_socket(gunicorn_server):
    server = gunicorn_server()
    response = requests.post(server.url + "/v1/chat", json={"text": "hi", "max_tokens": 4, "stream": True},
                             headers={"X-Request-ID": "sock-1"}, stream=True, timeout=60)
    assert response.headers["X-Request-ID"] == "sock-1"
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1].startswith("data: ") and '"done": true' in lines[-1]


def wait_for_ready_processes(server, count, timeout=120):
    def ready() -> int:
        return len(re.findall(r'^qaio_ready\{pid="\d+"\} 1\.0$', requests.get(server.url + "/metrics", timeout=10).text, re.M))

    eventually(lambda: ready() == count, timeout=timeout, what=f"{count} ready processes")


def test_metrics_add_up_across_gunicorn_processes(gunicorn_server):
    server = gunicorn_server(QAIO_WORKERS="2", QAIO_THREADS="8")
    wait_for_ready_processes(server, 2)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(
            lambda i: requests.post(server.url + "/v1/sentiment", json={"text": f"第{i}条"}, timeout=60).status_code,
            range(40)))
    assert statuses == [200] * 40
    for _ in range(10):  # every scrape, whichever process answers it, sees all processes' requests
        text = requests.get(server.url + "/metrics", timeout=10).text
        count = re.search(r'^qaio_queue_wait_seconds_count\{task="sentiment"\} (\S+)$', text, re.M)
        assert count and float(count.group(1)) == 40.0, text[-3000:]
    assert re.search(r'^qaio_model_info\{.*model="tiny".*\} 1\.0$', text, re.M)


@pytest.mark.parametrize("layout", [{}, {"QAIO_ENGINE_PROCESS": "on", "QAIO_WORKERS": "2", "QAIO_THREADS": "16"}],
                         ids=["one process", "engine process"])
def test_a_metrics_port_serves_metrics_and_nothing_else(gunicorn_server, layout):
    """For a NetworkPolicy that lets Prometheus reach the metrics and not the API: the port the connection
    came in on decides, whatever its Host header says."""
    from qaio_testing import free_port

    metrics_port = free_port()
    server = gunicorn_server(QAIO_METRICS_PORT=str(metrics_port), **layout)
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    assert "qaio_ready" in requests.get(metrics_url + "/metrics", timeout=10).text
    for method, path in (("POST", "/v1/sentiment"), ("GET", "/readyz"), ("POST", "/admin/drain"), ("GET", "/")):
        refused = requests.request(method, metrics_url + path, json={"text": "好"}, timeout=10,
                                   headers={"Host": f"127.0.0.1:{server.port}"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert requests.get(server.url + "/metrics", timeout=10, headers={"Host": f"127.0.0.1:{metrics_port}"}).status_code == 404
    assert requests.post(server.url + "/v1/sentiment", json={"text": "好"}, timeout=30).status_code == 200


@pytest.mark.gunicorn
@pytest.mark.parametrize("layout", [{}, {"QAIO_ENGINE_PROCESS": "on", "QAIO_WORKERS": "2"}], ids=["one process", "engine process"])
def test_a_failed_model_load_is_reported_at_once_not_after_the_readiness_wait(layout):
    """The GPU run's HTTP phase must not spend its slot waiting 600 s for a worker that will never load:
    /readyz says `failed` with the error, and wait_ready raises that (not a TimeoutError)."""
    server = GunicornServer("/nonexistent-model-dir", QAIO_FALLBACK_MODEL="", **layout)
    try:
        with pytest.raises(RuntimeError, match="failed to load: .*nonexistent-model-dir"):
            server.wait_ready(timeout=600)
    finally:
        server.stop()
