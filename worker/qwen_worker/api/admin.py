"""Operator endpoints: drain and undrain this instance. They exist only when QAIO_ADMIN_TOKEN is set, and
answer only to `Authorization: Bearer <that token>`."""
from __future__ import annotations

import hmac

from flask import Blueprint, jsonify, request

from ..errors import ApiError
from .common import service

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.before_request
def _authorize():
    token = service().config.admin_token
    if not token:  # disabled: indistinguishable from a route that does not exist
        raise ApiError(404, "not_found", "no such endpoint")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "the admin endpoints need Authorization: Bearer <QAIO_ADMIN_TOKEN>")


def _state(status):
    """The engine's state as its answer to this request said (an engine process's, not a mirror's)."""
    svc = service()
    return jsonify({"instance": svc.config.instance_id, "status": svc.readiness(status),
                    "draining": status.draining, "requests_held": status.busy})


@bp.post("/drain")
def drain():
    return _state(service().set_draining(True))


@bp.post("/undrain")
def undrain():
    return _state(service().set_draining(False))


@bp.get("/state")
def state():
    return _state(service().control_status())
