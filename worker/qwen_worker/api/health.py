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
    broken = svc.status().broken
    if broken:
        response = jsonify({"status": "broken", "instance": svc.config.instance_id, "error": broken})
        response.status_code = 503
        return response
    return jsonify({"status": "alive", "instance": svc.config.instance_id})


def kv_view(kv: dict[str, int]) -> dict:
    """The KV pool as an operator reads it: blocks and bytes in use, and the prefix cache's hit rate."""
    size = kv["block_bytes"]
    return {"blocks_total": kv["blocks_total"], "blocks_used": kv["blocks_used"], "blocks_cached": kv["blocks_cached"],
            "bytes_total": kv["blocks_total"] * size, "bytes_in_use": kv["blocks_used"] * size,
            "prefix_hit_rate": round(kv["prefix_hit_tokens"] / kv["prefix_query_tokens"], 4)
            if kv["prefix_query_tokens"] else None,
            "preemptions": kv["preemptions"], "evictions": kv["evictions"]}


@bp.get("/readyz")
def readyz():
    svc = service()
    status = svc.status()
    model = svc.model(status)
    body = {"status": svc.readiness(status), "instance": svc.config.instance_id, **model.describe,
            "queue_depth": status.queue_depth, "queue_capacity": svc.config.queue_capacity,
            "requests_held": status.busy, "sentiment_calibration": svc.calibration_view(model)}
    if status.kv is not None:
        body["kv_cache"] = kv_view(status.kv)
    if model.demo_info is not None:
        body["warning"] = "demo model: random weights, answers are meaningless"
    elif model.stand_in_info is not None:
        info = model.stand_in_info
        body["warning"] = f"stand-in model: {info['name']}, not {info['stands_in_for']}; {info['note']}"
    if model.fallback_reason:
        body["fallback_reason"] = f"QAIO_MODEL={svc.config.model} could not be loaded: {model.fallback_reason}"
    if status.load_error:
        body["error"] = status.load_error
    response = jsonify(body)
    if not status.ready:
        response.status_code = 503
        response.headers["Retry-After"] = str(svc.config.retry_after_s)
    return response
