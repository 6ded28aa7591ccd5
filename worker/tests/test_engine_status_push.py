"""The engine process's status push outlives a status it could not build: API processes read readiness
from it, and a push thread that died would leave them a stale state for good."""
import secrets
import threading

from qwen_worker.config import WorkerConfig
from qwen_worker.engine_server import EngineServer
from qwen_worker.protocol import Status
from qaio_testing import eventually

class Recorder:
    """Stands where an API process's connection is: keeps what is posted."""

    def __init__(self):
        self.posted = []

    def post(self, message):
        self.posted.append(message)

    def flush(self):
        pass

def test_a_status_that_fails_to_build_is_skipped_and_the_next_ones_still_go_out(tmp_path, monkeypatch):
    server = EngineServer(WorkerConfig.from_env({}), str(tmp_path / "engine.sock"), secrets.token_bytes(16))
    calls = []

    def status():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a model half loaded")
        return Status("loading", busy=len(calls))

    monkeypatch.setattr(server.host, "status", status)
    recorder = Recorder()
    server.connections = [recorder]

    threading.Thread(target=server._report_status, daemon=True).start()  # the push loop alone, no model
    try:
        eventually(lambda: len(recorder.posted) >= 2, what="statuses pushed after the failed one")
    finally:
        server.reports_stopped.set()
        server.listener.close()
    assert [s.busy for s in recorder.posted[:2]] == [2, 3]
