"""Worker fixtures: in-process apps on the tiny model (the model itself comes from the root conftest)."""
from __future__ import annotations

import pytest

from qwen_worker import create_app


def wait_ready(app, timeout: float = 120) -> None:
    service = app.extensions["qaio"]
    assert service.wait_loaded(timeout), "model did not load in time"
    assert service.health.ready(), f"worker not ready: {service.health.reason()} {service.health.load_error}"


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
