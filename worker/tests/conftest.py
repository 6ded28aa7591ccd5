"""Shared fixtures: the tiny random-weight Qwen2 model, in-process apps, and real gunicorn servers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from qwen_worker import create_app
from qwen_worker.demo_model import build

WORKER_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A freshly built tiny model (real Qwen2 architecture and tokenizer, random weights)."""
    return str(build("tiny", tmp_path_factory.mktemp("models") / "tiny"))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GunicornServer:
    """A real gunicorn process started with the project's own config file."""

    def __init__(self, model_dir: str, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "QAIO_MODEL": model_dir, "QAIO_PORT": str(self.port),
                       "QAIO_INSTANCE_ID": f"gunicorn-{self.port}", **env}
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(WORKER_DIR / "gunicorn.conf.py"), "qwen_worker:create_app()"],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.proc.stdout.read()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # refused, or accepted but the worker is still booting
                pass
            time.sleep(0.2)
        raise TimeoutError("gunicorn did not become ready")

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.stdout.read()


@pytest.fixture()
def gunicorn_server(tiny_model_dir):
    servers = []

    def start(**env: str) -> GunicornServer:
        server = GunicornServer(tiny_model_dir, **env)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
