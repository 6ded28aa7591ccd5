"""nginx test fixtures: real worker instances on the tiny model and real nginx in front of them."""
from __future__ import annotations

import pytest

from qwen_worker.testing import SHARED_CPU_WORKER_ENV, GunicornServer, NginxServer


@pytest.fixture(scope="session")
def workers(tiny_model_dir):
    """Two worker instances shared by the tests that do not kill them."""
    pair = [GunicornServer(tiny_model_dir, **SHARED_CPU_WORKER_ENV) for _ in range(2)]
    try:
        for worker in pair:
            worker.wait_ready()
        yield pair
    finally:
        for worker in pair:
            worker.stop()


@pytest.fixture()
def nginx():
    """Start nginx with QAIO_NGINX_* settings in front of the given upstreams; stopped after the test."""
    started = []

    def start(upstreams, **settings) -> NginxServer:
        server = NginxServer([getattr(u, "address", u) for u in upstreams], **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()

