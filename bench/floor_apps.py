"""The least a request can cost through the worker's gunicorn settings: apps that answer every path with
a fixed small JSON body, measured by `make bench-host` beside the worker's own `GET /healthz`."""
from __future__ import annotations

from flask import Flask

BODY = b'{"status":"ok"}\n'


def wsgi(environ, start_response):
    """A bare WSGI callable: gunicorn's parsing and writing, and nothing else."""
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))])
    return [BODY]


def flask_app() -> Flask:
    """A Flask app with one route and no hooks: what Flask's request handling adds to gunicorn's."""
    app = Flask(__name__)

    @app.get("/<path:anything>")
    def answer(anything):
        return {"status": "ok"}

    return app
