"""The one place that renders errors: ``{"error": {"message", "type", "code"}}``."""
from __future__ import annotations

import logging

import redis
from flask import Flask, Response, g, jsonify, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from flowpool.errors import FlowpoolError, OutcomeUnavailable, PayloadTooLarge, Unavailable

__all__ = ["http_error", "register_error_handlers", "render"]

log = logging.getLogger("flowpool.api")


def render(error: FlowpoolError) -> Response:
    """The HTTP response of one of our errors."""
    response = jsonify(error.to_body())
    response.status_code = error.status
    if error.details.get("request_id"):
        response.headers["X-Request-Id"] = str(error.details["request_id"])
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None and error.status in (429, 503):
        response.headers["Retry-After"] = str(retry_after)
    # The official OpenAI clients retry 408, 409, 429 and 5xx unless told: a retry that could run
    # the script again is refused here, whatever the status.
    response.headers["x-should-retry"] = "true" if error.retry_safe else "false"
    return response


def http_error(status: int, reason: str, message: str) -> FlowpoolError:
    """An HTTP error raised outside our code (werkzeug's, gunicorn's) as one of ours, its type named by its reason."""
    error = FlowpoolError(message or reason)
    error.status = status
    error.type = reason.lower().replace(" ", "_")
    return error


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(FlowpoolError, render)

    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    def _redis_down(exc: Exception) -> Response:
        log.warning("Redis unreachable: %s", exc)
        request_id = g.get("handed_over")
        if request_id is not None:  # the run may be going: name it, and a retry would run it again
            return render(OutcomeUnavailable(f"Redis became unreachable while this run was followed: {exc}; "
                                             f"look it up later with GET /api/v1/runs/{request_id}",
                                             request_id=request_id))
        return render(Unavailable(f"Redis is unreachable: {exc}"))

    @app.errorhandler(OperationalError)
    def _broker_down(exc: Exception) -> Response:
        log.warning("broker unreachable: %s", exc)
        return render(Unavailable(f"the broker is unreachable: {exc}"))

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Response:
        limit = request.max_content_length  # the route's own limit (api.body.own_body_limit), else the app's
        return render(PayloadTooLarge(f"the request body is over the limit of {limit} bytes"))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return render(http_error(exc.code or 500, exc.name, exc.description or ""))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error")
        return render(FlowpoolError(f"internal error: {type(exc).__name__}"))
