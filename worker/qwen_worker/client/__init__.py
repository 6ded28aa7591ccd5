"""The HTTP side's way to the engine: one interface (base.EngineClient), two transports, one factory."""
from __future__ import annotations

import os

from ..engine_process import SOCKET_ENV
from .base import EngineClient
from .handle import RequestHandle


def make_client(config, metrics) -> EngineClient:
    """Remote when gunicorn.conf.py started an engine process for this instance (QAIO_ENGINE_PROCESS
    on: it names its socket in our environment); otherwise the engine loop runs in this process."""
    if config.engine_process == "on" and os.environ.get(SOCKET_ENV):
        from .remote import RemoteClient

        return RemoteClient.from_env(config, metrics)
    from .inprocess import InProcessClient

    return InProcessClient(config, metrics)


__all__ = ["EngineClient", "RequestHandle", "make_client"]
