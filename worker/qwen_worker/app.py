"""The Flask app factory of the worker."""
from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Mapping

from flask import Flask, g, request

from . import logs
from .api import metrics, usage
from .config import WorkerConfig
from .connection import arrival, disconnect_probe
from .errors import ApiError, register_error_handlers
from .devices import cuda_expected
from .service import WorkerService

log = logging.getLogger("qaio")
access_log = logging.getLogger("qaio.access")

_TASK_BY_PATH = {"/v1/sentiment": "sentiment", "/v1/chat": "chat", "/v1/analyze": "analyze",
                 "/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/models": "models"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(config: WorkerConfig | Mapping[str, Any] | None = None, service: WorkerService | None = None) -> Flask:
    """Build the worker app; `config` is a WorkerConfig or overrides of the environment's settings."""
    if not isinstance(config, WorkerConfig):
        config = WorkerConfig.from_env(**dict(config or {}))
    logs.configure(config.log_level)
    log.info("configuration", extra={"config": config.as_log_dict()})

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.ensure_ascii = False  # Chinese stays readable in responses
    # Under gunicorn.conf.py with an engine process, this process is one of its API processes.
    service = service or WorkerService(config)
    app.extensions["qaio"] = service

    register_error_handlers(app)
    _install_request_tracking(app, config, service)
    _install_metrics_port(app, config)
    metrics.install(app, service.metrics, gpu_index=_gpu_index(config), other_heaps=service.client.other_heaps)

    from .api import admin, completions, health, openai_compat, tasks
    for blueprint in (health.bp, tasks.bp, openai_compat.bp, completions.bp, admin.bp):
        app.register_blueprint(blueprint)

    service.start()
    return app


def _gpu_index(config: WorkerConfig) -> int | None:
    if not cuda_expected(config.device):
        return None
    return int(config.device.partition(":")[2] or 0)


def _install_request_tracking(app: Flask, config: WorkerConfig, service: WorkerService) -> None:
    key_usage = usage.KeyUsage(service.metrics)

    @app.before_request
    def _start():
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.started = time.monotonic()
        g.arrived = arrival(request.headers.get("X-Request-Start"), g.started)  # deadlines count from here
        g.client_gone = disconnect_probe(request.environ)
        g.log_fields = {}
        g.cacheable = False  # set by views whose answer is a pure function of the request body
        if request.path.startswith("/v1/"):
            service.metrics.in_flight.inc()
            g.key_name = usage.key_name()
            if g.key_name:
                g.log_fields["key"] = g.key_name

    @app.after_request
    def _finish(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers["X-Instance"] = config.instance_id
        # The front door names the model its cache key holds; an answer from another model (a worker
        # that fell back, or one mid-rollout) must never be stored under that key.
        cache_model = request.headers.get("X-Qaio-Cache-Model")
        same_model = cache_model is None or cache_model == service.model().identity
        if g.get("cacheable") and same_model and response.status_code == 200 and config.cache_ttl_s > 0:
            response.headers["X-Accel-Expires"] = str(config.cache_ttl_s)
        else:
            response.headers["X-Accel-Expires"] = "0"
            response.headers["Cache-Control"] = "no-store"
        if request.path.startswith("/v1/"):
            _observe_on_close(response, service.metrics, key_usage, g.get("log_fields", {}).get("task"), g.started)
            access_log.info("request", extra={
                "request_id": g.get("request_id"), "method": request.method, "path": request.path,
                "status": response.status_code, "instance": config.instance_id,
                "duration_ms": round((time.monotonic() - g.get("started", time.monotonic())) * 1000, 2),
                **g.get("log_fields", {})})
        return response


def _install_metrics_port(app: Flask, config: WorkerConfig) -> None:
    """With QAIO_METRICS_PORT, that port serves /metrics and nothing else, and QAIO_PORT everything but
    /metrics: decided by the port the connection really came in on, never by a header."""
    if not config.metrics_port:
        return

    @app.before_request
    def _by_port():
        sock = request.environ.get("gunicorn.socket")
        if sock is None:  # not served by gunicorn (the test client): one port
            return
        if (sock.getsockname()[1] == config.metrics_port) != (request.path == "/metrics"):
            raise ApiError(404, "not_found", "no such endpoint")


def _observe_on_close(response, metrics, key_usage: usage.KeyUsage, task: str | None, started: float) -> None:
    """Count the request out when its last byte is sent: for a stream, when the stream ends; with the
    tokens it cost under its API key's name."""
    task = task or _TASK_BY_PATH.get(request.path, "other")
    code = str(response.status_code)
    key, groups = g.get("key_name", ""), g.get("usage_groups", [])

    def closed():
        metrics.in_flight.dec()
        metrics.labelled(metrics.request_duration, task, code).observe(time.monotonic() - started)
        if key:
            key_usage.observe(key, groups)

    response.call_on_close(closed)
