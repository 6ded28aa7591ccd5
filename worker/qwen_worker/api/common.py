"""Helpers shared by the API blueprints: the service, the response envelope, SSE framing."""
from __future__ import annotations

import json
from typing import Iterable, Iterator

from flask import Response, current_app, g, stream_with_context

from ..client import RequestHandle
from ..service import WorkerService


def service() -> WorkerService:
    return current_app.extensions["qaio"]


def envelope(jobs: Iterable[RequestHandle], **fields) -> dict:
    """Every task response: ids, instance, the model served (and whether it is a demo or a stand-in),
    the task's fields and timing."""
    jobs = list(jobs)
    svc = service()
    model = svc.model()
    timing = {"queue_ms": round(sum(j.queue_ms for j in jobs), 2),
              "compute_ms": round(sum(j.compute_ms for j in jobs), 2),
              "batch_size": max(j.batch_size for j in jobs)}
    g.log_fields.update(timing)
    return {"request_id": g.request_id, "instance": svc.config.instance_id, "model": model.name,
            "demo_model": model.demo_info is not None, "stand_in_model": model.stand_in_info is not None, **fields, "timing": timing}


def sse(events: Iterator[dict | str | list]) -> Response:
    """A text/event-stream response; nginx must not buffer it. A list of events is ready together (a
    stream's last text and its outcome): one write, not one per event."""
    def frame(event: dict | str) -> str:
        data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
        return f"data: {data}\n\n"

    def frames():
        for event in events:
            yield "".join(map(frame, event)) if isinstance(event, list) else frame(event)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(frames()), mimetype="text/event-stream", headers=headers)
