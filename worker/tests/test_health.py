"""Liveness and readiness around model loading."""
import threading

from qwen_worker import create_app
from qwen_worker.client.inprocess import InProcessClient
from qwen_worker.config import WorkerConfig
from qwen_worker.metrics import WorkerMetrics
from qwen_worker.model import ModelService
from qwen_worker.service import WorkerService


class GatedModel(ModelService):
    """The real model, whose loading waits until the test opens the gate."""

    gate = threading.Event()

    def load(self):
        assert self.gate.wait(60)
        super().load()


def test_ready_only_after_load_and_warmup(tiny_model_dir):
    config = WorkerConfig.from_env({}, dtype="float32", model=tiny_model_dir, instance_id="gated")
    metrics = WorkerMetrics()
    service = WorkerService(config, InProcessClient(config, metrics, model=GatedModel(config)), metrics)
    client = create_app(config, service=service).test_client()
    try:
        assert client.get("/healthz").status_code == 200
        before = client.get("/readyz")
        assert before.status_code == 503 and before.get_json()["status"] == "loading"
        assert before.headers["Retry-After"]
        refused = client.post("/v1/sentiment", json={"text": "早了"})
        assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "not_ready"
        GatedModel.gate.set()
        assert service.wait_loaded(60)
        after = client.get("/readyz")
        assert after.status_code == 200
        body = after.get_json()
        assert (body["status"], body["instance"], body["device"], body["dtype"], body["demo_model"]) == \
            ("ready", "gated", "cpu", "float32", True)
        assert "random weights" in body["warning"] and body["queue_depth"] == 0
    finally:
        service.stop()


def test_a_model_that_cannot_load_stays_unready_with_the_reason(tmp_path):
    app = create_app({"model": str(tmp_path / "no-such-model"), "instance_id": "broken"})
    service = app.extensions["qaio"]
    assert service.wait_loaded(60)
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["status"] == "failed" and response.get_json()["error"]
    assert app.test_client().get("/healthz").status_code == 200
