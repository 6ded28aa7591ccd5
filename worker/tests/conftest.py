"""Worker fixtures: in-process apps on the tiny model (the model itself comes from the root conftest)."""
from __future__ import annotations

import pytest

from qwen_worker import create_app
from qwen_worker.prompts import Message
from qwen_worker.protocol import Cancel


def wait_ready(app, timeout: float = 120) -> None:
    service = app.extensions["qaio"]
    assert service.wait_loaded(timeout), "model did not load in time"
    status = service.status()
    assert status.ready, f"worker not ready: {status.state} {status.load_error}"



@pytest.fixture(scope="session")
def make_app(tiny_model_dir):
    """Build a ready app on the tiny model with setting overrides; stopped at the end of the session."""
    apps = []

    def factory(wait: bool = True, **overrides):
        settings = {"model": tiny_model_dir, "instance_id": "test-worker", "batch_wait_ms": 20.0, **overrides}
        app = create_app(settings)
        apps.append(app)
        if wait:
            wait_ready(app)
        return app

    yield factory
    for app in apps:
        app.extensions["qaio"].stop()


@pytest.fixture(scope="session")
def app(make_app):
    return make_app()


@pytest.fixture()
def client(app):
    return app.test_client()


class GenerationBlocker:
    """Keeps a worker's engine busy with a long generation, to put requests behind it."""

    def __init__(self):
        self.jobs = []

    def occupy(self, service, max_tokens: int = 3000):
        """Start a long generation and return its job once it is really running (first token out)."""
        job = service.submit_generation(service.chat_ids([Message("user", "tell me a long story")]), max_tokens,
                                        service.deadline(60_000), task="chat", stream=True)
        self.jobs.append((service, job))
        while not job.tokens:
            assert not job.receive().final, "the long generation ended early"
        return job

    def release(self, job) -> None:
        """Stop it in the engine (the handle still waits for its last output)."""
        service = next(svc for svc, held in self.jobs if held is job)
        service.client.send_cancel(Cancel(job.request.id))
        assert job.wait().finish_reason == "cancelled"


@pytest.fixture()
def blocker():
    keeper = GenerationBlocker()
    yield keeper
    for service, job in keeper.jobs:
        service.client.send_cancel(Cancel(job.request.id))
