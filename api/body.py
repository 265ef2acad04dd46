"""Reading a request body off the connection before any view runs: bounded in size and in time.

Every route takes a small JSON or multipart body, so the body is read whole
into memory first, and the views parse it from there. Reading it here, rather
than lazily through werkzeug, settles three things in one place:

- A body that stalls (a client that sends fewer bytes than its
  ``Content-Length``, or stops mid-chunk) is answered 408 once no byte has
  arrived for FLOWPOOL_BODY_TIMEOUT_SECONDS, instead of holding the request
  (and, under gthread, a thread) until the client goes away. The wait is a
  timeout on the socket gunicorn hands over (``gunicorn.socket``), which a
  gevent socket honours by yielding, so other requests go on meanwhile.
- A chunked body over FLOWPOOL_MAX_BODY_BYTES is a 413, like a
  ``Content-Length`` over it; werkzeug would cut it at the limit silently and
  the view would see truncated JSON.
- After either, the connection is closed rather than drained for keep-alive:
  where the next request would start on it is unknown, or far away. The
  answer says so (``Connection: close``, see ``close_when_body_unread``), so
  a client does not send its next request on a connection about to close.
"""
from __future__ import annotations

import io
import socket
from typing import Any, Callable

from flask import current_app, request

from flowpool.errors import FlowpoolError, PayloadTooLarge, RequestError, RequestTimeout
from flowpool.settings import Settings

from .services import authenticate, services

__all__ = ["close_when_body_unread", "own_body_limit", "read_body"]

_PIECE = 64 << 10


def read_body() -> None:
    """A ``before_request`` hook: the body read into memory, or a 408/413/400 saying why it cannot be."""
    environ = request.environ
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    length = _content_length(environ.get("CONTENT_LENGTH"))
    if not chunked and not length:
        return
    stream = environ["wsgi.input"]
    settings = services().settings
    limit = _body_limit(settings)
    if limit > settings.max_body_bytes:
        _authenticate_first(stream)
    if length is not None and length > limit and not chunked:
        _close_after(stream)
        raise PayloadTooLarge(f"the request body is {length} bytes, over the limit of {limit} bytes")
    want = limit + 1 if chunked else int(length or 0)
    data = _read(stream, environ.get("gunicorn.socket"), want, settings.body_timeout_seconds)
    if chunked and len(data) > limit:
        _close_after(stream)
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    if not chunked and len(data) < want:
        raise RequestError(f"the request body ended after {len(data)} of its {want} bytes (Content-Length)")
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))
    environ.pop("HTTP_TRANSFER_ENCODING", None)  # the body is now a plain one of known length


def close_when_body_unread(wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """WSGI middleware: an answer after which gunicorn closes the connection, the body unread, says it will.

    gunicorn closes such a connection (``_close_after``, or a body read that
    raised: a 408) only after the answer, which it has sent saying
    keep-alive; it drops a ``Connection`` header the app sets. A client
    that believes it puts the connection back in its pool, and its next
    request there meets the close, a reset when the unread body was left
    behind. gunicorn's response object is told instead: the
    ``start_response`` it passes is that object's bound method, and a
    forced close is what its Connection header then announces.
    """
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        stream = environ.get("wsgi.input")  # gunicorn's Body; read_body swaps in a BytesIO only once it is read

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if getattr(stream, "failed", False) is True:
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if callable(force_close):
                    force_close()
            return start_response(status, headers, exc_info)

        return wsgi_app(environ, start)

    return app


def own_body_limit(limit: Callable[[Settings], int]) -> Callable[[Any], Any]:
    """Mark a view whose bodies may pass FLOWPOOL_MAX_BODY_BYTES: ``limit(settings)`` bytes is its own limit.

    For bulk routes (an upload with accessories, a datastore ingest): every
    other route keeps the small limit, so a large body cannot be sent where
    none is expected. On such a route the API key is checked before the
    body is read (a 401 costs no memory).
    """
    def mark(view: Any) -> Any:
        view.body_limit = limit
        return view
    return mark


def _body_limit(settings: Settings) -> int:
    """The body limit of this request's route (its own, or FLOWPOOL_MAX_BODY_BYTES); werkzeug is told it too."""
    view = current_app.view_functions.get(request.endpoint or "")
    own = getattr(view, "body_limit", None)
    if own is None:
        return settings.max_body_bytes
    request.max_content_length = limit = own(settings)
    return limit


def _authenticate_first(stream: Any) -> None:
    """On a route whose bodies may be large, the API key is checked before any of the body is read:
    a caller without a valid key gets its 401 without the server taking up to the route's limit in memory."""
    try:
        authenticate()  # the view's own call then finds the account in ``g``
    except FlowpoolError:
        _close_after(stream)
        raise


def _content_length(raw: str | None) -> int | None:
    """The Content-Length as a number (gunicorn has already refused a malformed one)."""
    return int(raw) if raw and raw.strip().isdigit() else None


def _read(stream: Any, sock: socket.socket | None, want: int, timeout: float) -> bytes:
    """Up to ``want`` bytes of ``stream``; RequestTimeout when none arrives for ``timeout`` seconds."""
    prior = sock.gettimeout() if sock is not None else None
    pieces: list[bytes] = []
    got = 0
    try:
        if sock is not None:
            sock.settimeout(timeout)
        while got < want:
            piece = stream.read(min(_PIECE, want - got))
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
    except (socket.timeout, TimeoutError):
        # gunicorn marks the body failed when its read raises, and closes the connection after the answer.
        raise RequestTimeout(f"the request body stopped arriving: no byte for {timeout:g} s "
                             f"after {got} bytes") from None
    finally:
        if sock is not None:
            try:
                sock.settimeout(prior)
            except OSError:
                pass  # the client is gone; nothing is sent on this socket again
    return b"".join(pieces)


def _close_after(stream: Any) -> None:
    """Have gunicorn close the connection after this answer instead of draining the unread body.

    ``failed`` is how gunicorn's own body marks a connection that must not be
    reused (``gunicorn.http.body.Body``); other servers have no such flag and
    are left to do as they do.
    """
    if hasattr(stream, "failed"):
        stream.failed = True
