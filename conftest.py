"""Fixtures shared by every test folder: the tiny random-weight Qwen2 model and real gunicorn workers."""
from __future__ import annotations

import pytest

from qwen_worker.demo_model import build
from qwen_worker.testing import GunicornServer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A freshly built tiny model (real Qwen2 architecture and tokenizer, random weights)."""
    return str(build("tiny", tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture()
def gunicorn_server(tiny_model_dir):
    """Start real worker instances on the tiny model; all are stopped after the test."""
    servers = []

    def start(**env: str) -> GunicornServer:
        server = GunicornServer(tiny_model_dir, **env)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
