"""What the front door exposes, and the JSON contract of errors nginx makes itself."""
import pytest
import requests

from qaio_testing import free_port


@pytest.fixture()
def proxy(workers, nginx):
    return nginx(workers)


@pytest.mark.parametrize("path", ["/metrics", "/readyz", "/healthz", "/nope", "/v1/../metrics"])
def test_internal_and_unknown_paths_are_json_404(proxy, path):
    response = requests.get(proxy.url + path, timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "qaio_" not in response.text


def test_nginx_health_is_for_probes(proxy):
    assert requests.get(proxy.url + "/nginx-health", timeout=10).json() == {"status": "ok"}


def test_body_over_the_limit_is_json_413(proxy):
    response = requests.post(proxy.url + "/v1/sentiment", data=b'{"text": "' + b"a" * 70000 + b'"}',
                             headers={"Content-Type": "application/json", "X-Request-ID": "big-1"}, timeout=10)
    assert response.status_code == 413
    assert response.json()["error"] == {"code": "payload_too_large", "message": "the body is larger than 64k",
                                        "request_id": "big-1"}


def test_worker_errors_pass_through_unchanged(proxy):
    response = requests.post(proxy.url + "/v1/sentiment", json={"text": ""}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "empty_text"
    assert response.headers["X-Served-By"]


def test_request_id_is_made_at_the_edge_or_kept(proxy):
    kept = requests.post(proxy.url + "/v1/sentiment", json={"text": "编号"}, headers={"X-Request-ID": "edge-7"},
                         timeout=30)
    assert kept.headers["X-Request-ID"] == "edge-7" and kept.json()["request_id"] == "edge-7"
    made = requests.post(proxy.url + "/v1/sentiment", json={"text": "编号2"}, timeout=30)
    assert len(made.headers["X-Request-ID"]) == 32 and made.json()["request_id"] == made.headers["X-Request-ID"]


def test_json_access_log_line(proxy):
    requests.post(proxy.url + "/v1/sentiment", json={"text": "日志"}, headers={"X-Request-ID": "log-42"}, timeout=30)
    entry = proxy.log_entries('"log-42"')[0]
    assert entry["status"] == 200 and entry["upstream"].startswith("127.0.0.1:")
    assert entry["cache"] in ("MISS", "HIT") and float(entry["upstream_time"]) >= 0


@pytest.mark.parametrize("headers", [{}, {"X-Conversation-Id": "conv-nobody"}], ids=["keyless", "conversation"])
def test_no_live_worker_is_a_json_503_to_retry(nginx, headers):
    """A conversation turn tries the ring, then goes by load (@qaio_502), and only then gets the 503."""
    from qaio_testing import free_port

    proxy = nginx([f"127.0.0.1:{free_port()}"])
    response = requests.post(proxy.url + "/v1/sentiment", json={"text": "有人吗"}, headers=headers, timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_worker_available" and response.headers["Retry-After"] == "1"


def test_stub_status_answers_on_its_own_port_only(workers, nginx):
    status_port = free_port()
    server = nginx(workers, QAIO_NGINX_STATUS_LISTEN=f"127.0.0.1:{status_port}")
    counters = requests.get(f"http://127.0.0.1:{status_port}/stub_status", timeout=10)
    assert counters.status_code == 200 and counters.text.startswith("Active connections:")
    assert requests.get(f"http://127.0.0.1:{status_port}/v1/sentiment", timeout=10).status_code == 404
    assert requests.get(server.url + "/stub_status", timeout=10).status_code == 404
