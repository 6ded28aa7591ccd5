"""The one error contract at the HTTP boundary: `{"error": {"code", "message", "request_id"}}`."""
from __future__ import annotations

import logging

from flask import Flask, current_app, g, jsonify
from werkzeug.exceptions import HTTPException

from .protocol import RequestFailed

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as JSON with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


# The one table from the engine's error codes to HTTP: (status, whether a retry elsewhere may succeed,
# so Retry-After is sent). nginx retries the 503s on another worker; the 4xx are the request's own.
ENGINE_ERRORS = {
    "queue_full": (503, True), "deadline_unreachable": (503, True), "draining": (503, True), "not_ready": (503, True), "device_error": (503, True),
    "engine_lost": (503, True), "out_of_memory": (503, True), "model_error": (503, True),
    "deadline_exceeded": (504, False), "prompt_too_long": (413, False), "invalid_token_id": (400, False),
    "client_closed_request": (499, False),  # answered to nobody: the access log and metrics see it
}


def engine_error(failure: RequestFailed, retry_after_s: int | None = None) -> ApiError:
    """The HTTP answer to a request the engine did not complete."""
    status, retry = ENGINE_ERRORS.get(failure.code, (503, True))
    if retry and retry_after_s is None:
        retry_after_s = current_app.extensions["qaio"].config.retry_after_s
    return ApiError(status, failure.code, failure.message, retry_after=retry_after_s if retry else None)


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


def error_response(err: ApiError):
    body = {"error": {"code": err.code, "message": err.message, "request_id": g.get("request_id")}}
    response = jsonify(body)
    response.status_code = err.status
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(err.retry_after)
    return response


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(err: ApiError):
        return error_response(err)

    @app.errorhandler(RequestFailed)
    def _engine_error(failure: RequestFailed):
        return error_response(engine_error(failure))

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        status = err.code or 500
        code = _HTTP_CODES.get(status, "bad_request" if status < 500 else "internal_error")
        return error_response(ApiError(status, code, err.description or err.name))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        # Our bug, never the client's: log the stack, answer in the same contract.
        log.exception("unhandled error")
        return error_response(ApiError(500, "internal_error", "internal error"))
