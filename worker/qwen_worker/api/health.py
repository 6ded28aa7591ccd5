"""Liveness and readiness probes."""
from __future__ import annotations

from flask import Blueprint, jsonify

from .common import service

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness: fails only when this instance cannot recover by itself (a sticky device error, or its
    engine process is gone), so that its supervisor restarts it."""
    svc = service()
    broken = svc.health.broken
    if broken:
        response = jsonify({"status": "broken", "instance": svc.config.instance_id, "error": broken})
        response.status_code = 503
        return response
    return jsonify({"status": "alive", "instance": svc.config.instance_id})


@bp.get("/readyz")
def readyz():
    svc = service()
    health = svc.health
    body = {"status": svc.readiness(), "instance": svc.config.instance_id, **svc.model.describe(),
            "queue_depth": svc.batcher.depth(), "queue_capacity": svc.config.queue_capacity,
            "requests_held": svc.batcher.busy()}
    if svc.model.is_demo:
        body["warning"] = "demo model: random weights, answers are meaningless"
    elif svc.model.is_stand_in:
        info = svc.model.stand_in_info
        body["warning"] = f"stand-in model: {info['name']}, not {info['stands_in_for']}; {info['note']}"
    if svc.model.fallback_reason:
        body["fallback_reason"] = f"QAIO_MODEL={svc.config.model} could not be loaded: {svc.model.fallback_reason}"
    if health.load_error:
        body["error"] = health.load_error
    response = jsonify(body)
    if not health.ready():
        response.status_code = 503
        response.headers["Retry-After"] = str(svc.config.retry_after_s)
    return response
