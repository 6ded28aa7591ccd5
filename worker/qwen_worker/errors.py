"""The one error contract at the HTTP boundary: `{"error": {"code", "message", "request_id"}}`."""
from __future__ import annotations

import logging

from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as JSON with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


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
