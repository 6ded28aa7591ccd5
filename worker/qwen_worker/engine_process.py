"""Starting and stopping an instance's engine process (qwen_worker.engine_server) from gunicorn's master.

Light on purpose: the master imports it, and must import neither torch nor prometheus_client.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile

SOCKET_ENV = "QAIO_ENGINE_SOCKET"  # where the engine listens; set only where an engine process runs
AUTHKEY_ENV = "QAIO_ENGINE_AUTHKEY"  # hex; API processes prove they were started beside this engine
ENGINE_PID_ENV = "QAIO_ENGINE_PID"
MASTER_PID_ENV = "QAIO_ENGINE_MASTER_PID"  # told to stop when the engine process is gone


def start() -> subprocess.Popen:
    """Start the engine and put what the API processes (forked later) need to reach it in the environment."""
    directory = tempfile.mkdtemp(prefix="qaio-engine-")  # 0700: only this user reaches the socket
    os.environ[SOCKET_ENV] = os.path.join(directory, "engine.sock")
    os.environ[AUTHKEY_ENV] = secrets.token_hex(16)
    os.environ[MASTER_PID_ENV] = str(os.getpid())
    engine = subprocess.Popen([sys.executable, "-m", "qwen_worker.engine_server"])
    os.environ[ENGINE_PID_ENV] = str(engine.pid)
    return engine


def stop(engine: subprocess.Popen, timeout: float = 30) -> None:
    engine.terminate()
    try:
        engine.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        engine.kill()
        engine.wait()
    shutil.rmtree(os.path.dirname(os.environ[SOCKET_ENV]), ignore_errors=True)
