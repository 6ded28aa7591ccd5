"""gunicorn settings for one worker instance, all from QAIO_* variables (see README).

    gunicorn -c worker/gunicorn.conf.py 'qwen_worker:create_app()'
"""
import os
import shutil
import tempfile

from qwen_worker import engine_process as qwen_engine_process
from qwen_worker.config import WorkerConfig

_config = WorkerConfig.from_env()  # fails fast, before any process starts, on a bad setting
# Nothing else of the app is imported here: prometheus_client must first see PROMETHEUS_MULTIPROC_DIR.

bind = [f"{_config.host}:{_config.port}"]
if _config.metrics_port:  # /metrics only (the app refuses everything else there)
    bind.append(f"{_config.host}:{_config.metrics_port}")
# With an engine process (the default on a GPU) these are API processes sharing it; without one, each
# process loads its own model copy (one per instance is the norm).
workers = _config.workers
engine_process = _config.engine_process == "on"
# gevent where the engine runs in its own process: an API process then only speaks HTTP, and an event
# loop costs less per request than gthread's thread hand-offs (docs/benchmarks-host.md). gunicorn
# monkey-patches the process before it loads the app, so the engine client's threads, queues and socket
# wait cooperatively.
# (gunicorn's gevent worker, closing idle keep-alive connections when it stops: qwen_worker/gevent_worker.py)
worker_class = {"gevent": "qwen_worker.gevent_worker.ClosingGeventWorker", "gthread": "gthread"}[_config.http_worker]
threads = _config.threads  # gthread: requests waiting on the batcher each hold a thread
# gthread queues requests beyond its threads where no admission bound, deadline or metric sees them.
# Behind nginx that never happens: its max_conns per worker is the capacity, below the threads. Idle
# keepalive connections from nginx (up to 32 per nginx worker process) count as connections here but
# hold no thread, so room is left for them; a client bypassing nginx can have at most that many
# requests waiting for a thread. gevent: the most greenlets (open connections) per process.
worker_connections = threads + 256
# The model loads in a background thread, so the worker heartbeats during load; this bounds a stuck worker.
timeout = 120
# Let in-flight generations finish on SIGTERM (k8s terminationGracePeriodSeconds must be longer).
graceful_timeout = _config.chat_deadline_ms // 1000 + 10
keepalive = 75  # longer than nginx's upstream keepalive_timeout (60 s), so nginx closes first
accesslog = None  # the app writes one JSON line per request
errorlog = "-"
loglevel = _config.log_level.lower()
preload_app = False  # every process loads its own model after the fork
# gunicorn's control socket has one fixed default path, which several instances on a host would share.
control_socket_disable = True

# Several processes share metrics through files (prometheus_client multiprocess mode).
if (workers > 1 or engine_process) and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="qaio-metrics-")

_engine = None


def on_starting(server):
    """Start the engine process before the API processes fork: they reach it through the socket named
    in their environment, and stop this master if it ever exits."""
    global _engine
    if engine_process:
        _engine = qwen_engine_process.start()
        server.log.info("engine process started (pid %s)", _engine.pid)


def on_exit(server):
    if _engine is not None:  # the API processes have finished their requests by now
        qwen_engine_process.stop(_engine)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if directory.startswith(tempfile.gettempdir()) and "qaio-metrics-" in directory:
        shutil.rmtree(directory, ignore_errors=True)


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
