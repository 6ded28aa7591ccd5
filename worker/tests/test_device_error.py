"""A sticky device error (a CUDA error that is not an out-of-memory) is fatal: the engine stops, what it
held is answered 503, /healthz fails, and the process ends so that its supervisor replaces it. Injected on
the CPU with the message CUDA gives, through the same code path."""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from qwen_worker.core.failures import is_fatal_device_error, is_oom
from qaio_testing import STICKY_DEVICE_ERROR, engine_host, eventually


@pytest.mark.parametrize("message, fatal", [
    (STICKY_DEVICE_ERROR, True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("CUDA error: out of memory", False),
    ("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate", False),
    ("index 5200 is out of bounds for dimension 0 with size 5121", False),
])
def test_which_errors_are_sticky(message, fatal):
    assert is_fatal_device_error(RuntimeError(message)) is fatal
    if fatal:
        assert not is_oom(RuntimeError(message))


def test_a_sticky_device_error_stops_the_engine_and_fails_liveness(make_app):
    app = make_app(max_batch_size=2, queue_capacity=8, device_error_exit_s=0)
    service = app.extensions["qaio"]
    host = engine_host(service)
    runner = host.model.engine.runner
    decode = runner.decode
    broken = {"now": False}

    def decode_or_fail(rows, width, fed=None):
        if broken["now"]:
            raise RuntimeError(STICKY_DEVICE_ERROR)
        return decode(rows, width, fed)

    runner.decode = decode_or_fail
    client = app.test_client()
    chat = {"text": "讲一个很长的故事", "max_tokens": 1000, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(client.post, "/v1/chat", json=chat) for _ in range(4)]  # 2 generating, 2 queued
        eventually(lambda: host.model.engine.live() == 2 and service.status().queue_depth == 2,
                   what="two rows generating and two queued")
        broken["now"] = True
        answers = [f.result(timeout=60) for f in held]
    assert [a.status_code for a in answers] == [503] * 4
    assert {a.get_json()["error"]["code"] for a in answers} == {"device_error"}
    assert all(a.headers["Retry-After"] for a in answers)
    live = client.get("/healthz")
    assert live.status_code == 503 and live.get_json()["status"] == "broken"
    assert "illegal memory access" in live.get_json()["error"]
    assert client.get("/readyz").status_code == 503
    later = client.post("/v1/sentiment", json={"text": "还在吗"})
    assert later.status_code == 503 and later.get_json()["error"]["code"] == "device_error"
    eventually(lambda: not host.loop._thread.is_alive(), what="the engine thread ends")
    assert host.model.engine.live() == 0
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'qaio_model_failures_total{reason="device_error"} 1.0' in metrics and "qaio_ready 0.0" in metrics


def worker_pids(server) -> set[str]:
    return set(Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split())


def test_the_worker_process_is_replaced_after_one(gunicorn_server):
    """In a real gunicorn worker: the trigger's chat gets 503 device_error and the process exits;
    gunicorn's master starts a fresh one (a new device context) that serves again."""
    server = gunicorn_server(app="qaio_testing:device_error_app()", QAIO_DEVICE_ERROR_EXIT_S="1",
                             QAIO_TORCH_THREADS="1")
    before = worker_pids(server)
    assert requests.post(server.url + "/v1/chat", json={"text": "hello", "max_tokens": 2}, timeout=60).status_code == 200
    bad = requests.post(server.url + "/v1/chat", json={"text": "inject a device error", "max_tokens": 4},
                        timeout=60)
    assert bad.status_code == 503 and bad.json()["error"]["code"] == "device_error"

    def replaced() -> bool:
        pids = worker_pids(server)
        return bool(pids) and not pids & before and requests.get(server.url + "/readyz", timeout=5).status_code == 200

    eventually(lambda: _quietly(replaced), 180, "a fresh worker process, ready, after the device error")
    assert server.proc.poll() is None  # the instance (gunicorn's master) lives on
    assert "sticky device error" in server.log_path.read_text()
    fine = requests.post(server.url + "/v1/chat", json={"text": "hello", "max_tokens": 2}, timeout=60)
    assert fine.status_code == 200


def _quietly(predicate) -> bool:
    try:
        return predicate()
    except (requests.RequestException, OSError):
        return False
