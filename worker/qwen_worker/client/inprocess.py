"""The engine loop on a thread of this process (the default on a CPU)."""
from __future__ import annotations

import os
import signal

from ..core.host import EngineHost
from ..metrics import WorkerMetrics
from ..protocol import Cancel, Control, Request, Status
from .base import EngineClient


class InProcessClient(EngineClient):
    def __init__(self, config, metrics: WorkerMetrics, model=None):
        super().__init__()
        # After a sticky device error this process ends: gunicorn's worker stops gracefully on SIGTERM
        # and its master forks a fresh one.
        self.host = EngineHost(config, metrics, sink=self.deliver, model=model,
                               exit_process=lambda: os.kill(os.getpid(), signal.SIGTERM))

    @property
    def prompter(self):
        return self.host.model.prompter if self.host.health.state == "ready" else None

    def send_request(self, request: Request, handle=None) -> None:
        self.host.submit(request)

    def send_cancel(self, cancel: Cancel) -> None:
        self.host.cancel(cancel.id, cancel.reason)

    def status(self) -> Status:
        return self.host.status()

    def control(self, op: str) -> Status:
        return self.host.control(Control(0, op))

    def start(self) -> None:
        self.host.start()

    def stop(self) -> None:
        self.host.stop()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self.host.loaded.wait(timeout)
