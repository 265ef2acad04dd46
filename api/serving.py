"""gunicorn's own error answers in flowpool's JSON format.

Some requests never reach Flask: gunicorn refuses a malformed request line
(400), a URL past ``limit_request_line`` (414), headers past
``limit_request_field_size`` or ``limit_request_fields`` (431) and the like
itself, in its worker's ``handle_error``, which writes every such answer
through one function, ``gunicorn.util.write_error``, as an HTML page. Putting
:func:`write_json_error` in its place in each worker process (from the
``post_worker_init`` hook, whatever the worker class) makes those answers
read like every other error of the API: ``{"error": {"message", "type",
"code"}}``, with gunicorn still choosing the status and logging.
"""
from __future__ import annotations

import json
import socket

from gunicorn import util

from .errors import http_error

__all__ = ["use_json_error_pages", "write_json_error"]

# gunicorn's reasons that say the client sent something wrong, as our error types.
_TYPES = {400: "invalid_request_error", 500: "internal_error"}


def use_json_error_pages() -> None:
    """Make gunicorn answer its own errors (400, 414, 431...) in this process as JSON."""
    util.write_error = write_json_error


def error_document(status: int, reason: str, message: str) -> bytes:
    """The HTTP answer, head and body, of one of gunicorn's errors."""
    error = http_error(status, reason, message)
    error.type = _TYPES.get(status, error.type)
    body = json.dumps(error.to_body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    return head + body


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for ``gunicorn.util.write_error`` (same arguments), answering JSON instead of HTML."""
    util.write_nonblock(sock, error_document(status_int, reason, mesg))
