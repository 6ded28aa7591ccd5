"""Real processes for tests and benchmarks: gunicorn workers and nginx, started by the project's own files.

Outside the worker package (the images do not install it); tests and benches run from the repository's
root, which puts it on the path."""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUNICORN_CONF = REPO / "worker" / "gunicorn.conf.py"
RENDER_NGINX = REPO / "nginx" / "render-config.sh"
API_KEY_SCRIPT = REPO / "scripts" / "api-key.sh"
STACK_SCRIPT = REPO / "scripts" / "stack.sh"


# What this process made under the system's temporary directory (not pytest's private base: nginx's
# workers run as nobody and must reach a prefix), removed when it exits: tests read logs after stop().
_SCRATCH: list[Path] = []


def scratch_dir(prefix: str) -> Path:
    """A new directory under the system's temporary directory, removed when this process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _SCRATCH.append(path)
    return path


def scratch_file(prefix: str, suffix: str = "") -> Path:
    """A new empty file under the system's temporary directory, removed when this process exits."""
    descriptor, name = tempfile.mkstemp(prefix=prefix, suffix=suffix)
    os.close(descriptor)
    _SCRATCH.append(Path(name))
    return Path(name)


@atexit.register
def _remove_scratch() -> None:
    for path in _SCRATCH:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# How long a test waits for state that another thread or process writes after the answer it got
# (metrics, mirrors of the engine, log lines): long enough for a machine loaded by other work.
EVENTUALLY_S = 30.0


def eventually(predicate, timeout: float = EVENTUALLY_S, what: str = "the condition", interval: float = 0.05):
    """predicate()'s first truthy value, polled until `timeout`: tests wait for conditions, never for time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def engine_host(service):
    """The engine host (model, loop, health) of an in-process worker's service, for tests that reach in."""
    return service.client.host


def metric(server, name: str, labels: str = "") -> float:
    """The sum of one series of a worker's /metrics (`labels` as exposed, e.g. '{task="chat"}')."""
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int) -> int:
    """First of `count` consecutive ports that are free right now (for `base + i` port schemes)."""
    for _ in range(50):
        base = free_port()
        sockets = []
        try:
            for offset in range(count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET, or None while nothing answers (refused, or accepted but still booting)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError):
        return None


def load_failure(url: str) -> str | None:
    """What a worker's /readyz says went wrong when its model load failed (it stays up, 503 for good)."""
    import json

    try:
        with urllib.request.urlopen(url, timeout=2.0):
            return None
    except urllib.error.HTTPError as err:
        try:
            body = json.loads(err.read())
        except ValueError:
            return None
        return body.get("error") or "failed" if isinstance(body, dict) and body.get("status") == "failed" else None
    except (OSError, urllib.error.URLError):
        return None


def wait_for(url: str, proc: subprocess.Popen, timeout: float, what: str, log: Path,
             failed: Callable[[], str | None] | None = None) -> None:
    """Until `url` answers 200; raises at once when the process exits or `failed()` names a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; last of {log}:\n{log.read_text()[-3000:]}")
        status = http_status(url)
        if status == 200:
            return
        if status == 503 and failed is not None and (reason := failed()):
            raise RuntimeError(f"{what} failed to load: {reason}; last of {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{what} was not ready at {url} within {timeout} s")


def _stop_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class GunicornServer:
    """One worker instance: gunicorn with worker/gunicorn.conf.py, in its own process group."""

    def __init__(self, model: str, port: int | None = None, log_path: str | None = None,
                 app: str = "qwen_worker:create_app()", host: str = "127.0.0.1", conf: str | None = None, **env: str):
        """conf: another checkout's gunicorn.conf.py (a bench's `before` tree runs its own settings)."""
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.address = f"{host}:{self.port}"
        self.model = model  # what nginx in front of it must name as QAIO_MODEL for its cache key
        environment = {**os.environ, "QAIO_MODEL": model, "QAIO_HOST": host, "QAIO_PORT": str(self.port),
                       "QAIO_INSTANCE_ID": f"worker-{self.port}", **env}
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        # A file, never an unread pipe: once a pipe's buffer fills, every logging call blocks the worker.
        self.log_path = Path(log_path) if log_path else scratch_file(f"qaio-worker-{self.port}-", ".log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", str(conf or GUNICORN_CONF), app],
                env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> "GunicornServer":
        url = self.url + "/readyz"
        wait_for(url, self.proc, timeout, "gunicorn", self.log_path, failed=lambda: load_failure(url))
        return self

    def kill(self) -> None:
        """SIGKILL the whole instance, as a crash would."""
        _stop_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop_group(self.proc)


class NginxServer:
    """A real nginx with the configuration rendered by nginx/render-config.sh from QAIO_NGINX_* settings;
    `binary`: another nginx than the system's (scripts/fetch-nginx.sh's, for what Debian's 1.22 lacks)."""

    def __init__(self, upstreams: list[str], port: int | None = None, prefix: str | None = None,
                 binary: str = "nginx", **settings: str):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = prefix or str(scratch_dir("qaio-nginx-"))
        env = {**os.environ, "QAIO_NGINX_LISTEN": f"127.0.0.1:{self.port}",
               "QAIO_NGINX_UPSTREAMS": ",".join(upstreams), **settings}
        rendered = subprocess.run([str(RENDER_NGINX), self.prefix], env=env, check=True, capture_output=True, text=True)
        self.conf = rendered.stdout.strip().splitlines()[-1]
        error_log = Path(self.prefix) / "logs" / "error.log"
        self.proc = subprocess.Popen(
            [binary, "-p", self.prefix, "-c", self.conf, "-e", str(error_log), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.url + "/nginx-health", self.proc, 30, "nginx", error_log)

    @property
    def access_log(self) -> Path:
        return Path(self.prefix) / "logs" / "access.log"

    def log_entries(self, contains: str, count: int = 1) -> list[dict]:
        """The access log's JSON entries whose line contains `contains`, once there are `count` of them:
        nginx writes a request's line after its last byte, so a client can read its answer first."""
        import json

        def entries():
            lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
            found = [json.loads(line) for line in lines if contains in line]
            return found if len(found) >= count else None

        return eventually(entries, what=f"{count} access-log lines with {contains}")

    def stop(self) -> None:
        _stop_group(self.proc, signal.SIGQUIT)


def add_api_key(path: Path, name: str, *fields: str) -> str:
    """A new API key's line added to a keys file by the project's script (scripts/api-key.sh); the key returned."""
    out = subprocess.run([str(API_KEY_SCRIPT), "add", str(path), name, *fields], check=True, capture_output=True,
                         text=True)
    return out.stdout.strip()


# Several instances sharing one machine's cores: one torch thread each keeps them from fighting.
SHARED_CPU_WORKER_ENV = {"QAIO_TORCH_THREADS": "1", "QAIO_BATCH_WAIT_MS": "5",
                         "QAIO_THREADS": "16"}


def served_by(headers) -> str:
    """The worker that finally answered through nginx (X-Served-By lists every one tried, and after a
    redirect to another upstream the first one's before " : ")."""
    return headers["X-Served-By"].split(" : ")[-1].split(",")[-1].strip()


class LocalStack:
    """The whole `make run` stack, started by scripts/stack.sh itself: workers, nginx, Prometheus, mtail;
    every port free, in a directory of its own (`prefix`); `env`: further settings."""

    def __init__(self, model: str, workers: int = 2, prefix: str = "qaio-stack-", timeout: float = 900, **env: str):
        self.dir = scratch_dir(prefix)
        base = free_port_range(workers)
        self.worker_addresses = [f"127.0.0.1:{base + i}" for i in range(workers)]
        self.port, self.prometheus_port, mtail_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prometheus_url = f"http://127.0.0.1:{self.prometheus_port}"
        self.env = {**os.environ, "QAIO_MODEL": model, "QAIO_STACK_DIR": str(self.dir),
                    "QAIO_STACK_WORKERS": str(workers), "QAIO_STACK_BASE_PORT": str(base),
                    "QAIO_NGINX_LISTEN": f"127.0.0.1:{self.port}", "QAIO_STACK_PROMETHEUS_PORT": str(self.prometheus_port),
                    "QAIO_STACK_MTAIL_PORT": str(mtail_port), "QAIO_PYTHON": sys.executable, **env}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        started = subprocess.run([str(STACK_SCRIPT), "up", "--detach"], env=self.env, capture_output=True, text=True,
                                 timeout=timeout)
        if started.returncode != 0:
            raise RuntimeError(f"scripts/stack.sh up failed:\n{started.stdout}\n{started.stderr}")
        self.output = started.stdout

    @property
    def access_log(self) -> Path:
        return self.dir / "nginx" / "logs" / "access.log"

    def stop(self) -> subprocess.CompletedProcess:
        return subprocess.run([str(STACK_SCRIPT), "down"], env=self.env, capture_output=True, text=True, timeout=300)


STICKY_DEVICE_ERROR = "CUDA error: an illegal memory access was encountered"


def arm_device_error(model, trigger: str = "inject a device error") -> None:
    """Make `model` (a ModelService, before it loads) raise what CUDA raises after an illegal memory
    access at the first decode step of any generation whose prompt holds `trigger` (a whole message),
    through the same code path a real one takes."""
    build_engine = model.build_engine

    def armed(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        trigger_ids = model.prompter.plain(trigger)
        marked: set[int] = set()
        add, decode = engine.add, engine.runner.decode

        def add_marking(row, on_done, on_start=None):
            ids = row.prompt_ids
            if any(ids[i:i + len(trigger_ids)] == trigger_ids for i in range(len(ids) - len(trigger_ids) + 1)):
                marked.add(id(row))
            add(row, on_done, on_start)

        def decode_failing(rows, width, fed=None):
            if any(id(row) in marked for row in engine.scheduler.rows.values()):
                raise RuntimeError(STICKY_DEVICE_ERROR)
            return decode(rows, width, fed)

        engine.add, engine.runner.decode = add_marking, decode_failing
        return engine

    model.build_engine = armed


def device_error_app():
    """gunicorn's app for tests of a sticky device error in a real one-process worker: create_app()
    whose engine fails as arm_device_error says."""
    from qwen_worker import create_app
    from qwen_worker.client.inprocess import InProcessClient
    from qwen_worker.config import WorkerConfig
    from qwen_worker.service import WorkerService

    config = WorkerConfig.from_env()
    service = WorkerService(config)
    assert isinstance(service.client, InProcessClient), "the engine-process layout arms its engine server"
    arm_device_error(service.client.host.model)  # before the loader thread starts (create_app starts it)
    return create_app(config, service=service)
