"""Qwen All-in-One model worker: one model, sentiment / chat / analyze over HTTP, batched.

The package root stays light: gunicorn's master imports `qwen_worker.config` before forking, and must
not import prometheus_client (which picks its multiprocess storage at import) or torch there.
"""

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
