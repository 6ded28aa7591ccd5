"""Drain and undrain (the operator's fault button), in both process layouts, over real gunicorn."""
import json

import pytest
import requests

from qwen_worker.config import ConfigError, WorkerConfig
from qaio_testing import eventually, metric

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LAYOUTS = {"one process": {}, "engine process": {"QAIO_ENGINE_PROCESS": "on", "QAIO_WORKERS": "2", "QAIO_THREADS": "16"}}


def test_without_a_token_setting_the_admin_endpoints_do_not_exist(client):
    for path in ("/admin/drain", "/admin/undrain"):
        response = client.post(path, headers=AUTH)
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "not_found"
    assert client.get("/readyz").get_json()["status"] == "ready"


def test_the_token_is_checked_validated_and_never_logged():
    with pytest.raises(ConfigError, match="QAIO_ADMIN_TOKEN"):
        WorkerConfig.from_env({"QAIO_ADMIN_TOKEN": "short"})
    with pytest.raises(ConfigError, match="QAIO_ADMIN_TOKEN"):
        WorkerConfig.from_env({"QAIO_ADMIN_TOKEN": 'has"quote-and-$dollar-x'})
    config = WorkerConfig.from_env({"QAIO_ADMIN_TOKEN": TOKEN})
    assert config.as_log_dict()["QAIO_ADMIN_TOKEN"] == "<set>" and TOKEN not in json.dumps(config.as_log_dict())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_drain_refuses_new_work_finishes_what_it_holds_then_undrains(gunicorn_server, layout):
    server = gunicorn_server(QAIO_ADMIN_TOKEN=TOKEN, **LAYOUTS[layout])
    url = server.url
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        refused = requests.post(url + "/admin/drain", headers=headers, timeout=10)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert requests.get(url + "/readyz", timeout=10).json()["status"] == "ready"

    # A stream in flight when the drain comes must still be answered in full.
    stream = requests.post(url + "/v1/chat", stream=True, timeout=60,
                           json={"text": "a long story", "max_tokens": 400, "temperature": 0, "stream": True})
    lines = stream.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line).startswith("data: ")

    drained = requests.post(url + "/admin/drain", headers=AUTH, timeout=10)
    assert drained.status_code == 200 and drained.json()["draining"] is True
    # Every API process refuses at once (the engine refuses for those whose mirror is not updated yet).
    for _ in range(8):
        response = requests.post(url + "/v1/sentiment", json={"text": "很好吃"}, timeout=10)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1", response.text
        assert response.json()["error"]["code"] == "draining"
    eventually(lambda: requests.get(url + "/readyz", timeout=10).status_code == 503, what="not ready")

    events = [json.loads(line[6:]) for line in lines if line]
    assert events[-1].get("done") is True and events[-1]["usage"]["completion_tokens"] == 400, events[-1]
    eventually(lambda: requests.get(url + "/readyz", timeout=10).json()["status"] == "drained", what="drained")
    ready = requests.get(url + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["requests_held"] == 0
    eventually(lambda: metric(server, "qaio_draining") == 1, what="qaio_draining 1")
    eventually(lambda: metric(server, "qaio_rejections_total", '{reason="draining"}') >= 8, what="8 rejections")

    undrained = requests.post(url + "/admin/undrain", headers=AUTH, timeout=10)
    assert undrained.status_code == 200 and undrained.json()["status"] == "ready"
    for _ in range(4):
        assert requests.post(url + "/v1/sentiment", json={"text": "很好吃"}, timeout=30).status_code == 200
    # Other API processes' /readyz follow within a status interval (250 ms).
    eventually(lambda: requests.get(url + "/readyz", timeout=10).status_code == 200, what="ready again")
    eventually(lambda: metric(server, "qaio_draining") == 0, what="qaio_draining back to 0")


def test_requests_in_flight_and_their_duration_count_streams_to_their_end(gunicorn_server):
    server = gunicorn_server()
    stream = requests.post(server.url + "/v1/chat", stream=True, timeout=60,
                           json={"text": "story", "max_tokens": 300, "temperature": 0, "stream": True})
    lines = stream.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line)
    assert metric(server, "qaio_requests_in_flight") == 1  # the stream, while it streams
    assert metric(server, "qaio_request_duration_seconds_count", '{code="200",task="chat"}') == 0
    list(lines)
    # Counted out when the last byte has gone, after the client may already have read it.
    eventually(lambda: metric(server, "qaio_requests_in_flight") == 0, what="the stream counted out")
    eventually(lambda: metric(server, "qaio_request_duration_seconds_count", '{code="200",task="chat"}') == 1,
               what="the stream's duration observed")
    requests.post(server.url + "/v1/sentiment", json={"text": ""}, timeout=10)
    eventually(lambda: metric(server, "qaio_request_duration_seconds_count", '{code="400",task="sentiment"}') == 1,
               what="the 400's duration observed")
    assert metric(server, "qaio_request_duration_seconds_count", '{code="200",task="chat"}') == 1
