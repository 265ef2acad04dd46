"""What both clients do without I/O: their options, the calls they send, when to retry, how to read an answer.

:class:`Flowpool` (requests) and :class:`AsyncFlowpool` (httpx2) differ only
in how they move bytes. Everything else is here, as plain functions a test
can call without a server: a resource method describes its request as a
:class:`Call` (route, body, headers, whether it may be sent again, how its
answer becomes the value returned), the client sends it, and
:func:`decode` turns the answer into JSON or the :class:`APIError` of its
status.

Retries. Every invoke carries an ``Idempotency-Key`` (a new one per call
unless given, the same on each of its tries), so such a call may be sent
again safely: when nothing came back (a connection refused or dropped before
the answer, an API process restarting) or the server marks its 429/503
``x-should-retry: true``, after its ``Retry-After``. One asking for more
than :data:`MAX_RETRY_WAIT` seconds is raised at once (a spent budget).
Errors of the run (500, 408) are never retried, and neither is a read that
timed out: the client's timeout bounds each try of the call.
"""
from __future__ import annotations

import datetime
import email.utils
import json
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Tuple, Union

from .errors import APIConnectionError, APIError, error_for
from .objects import Obj

if TYPE_CHECKING:
    from ..multipart import MultipartBody

__all__ = ["Call", "Options", "Timeout", "backoff", "decode", "event", "idempotency_key", "invoke_body",
           "is_event_stream", "longer", "options", "retry_wait", "unfinished"]

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
# Longer than the server's longest run by default: a call waits for its run, however long it was allowed.
DEFAULT_TIMEOUT = 660.0
DEFAULT_MAX_RETRIES = 2
# The longest wait between two tries that a Retry-After header can ask for.
MAX_RETRY_WAIT = 10.0

#: Seconds for each try: one number, a (connect, read) pair, or None for no limit.
Timeout = Union[float, Tuple[float, float], None]

# The options `with_options` may change.
_CHANGEABLE = ("api_key", "base_url", "timeout", "max_retries", "default_headers")


@dataclass(frozen=True)
class Options:
    """A client's settings: whom it calls, as whom, how long it waits and how often it tries again."""

    api_key: Optional[str]
    base_url: str
    timeout: Timeout = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    default_headers: Mapping[str, str] = field(default_factory=dict)
    # The header the key goes in: x-api-key, or X-Maitai-Api-Key for the Maitai clients.
    key_header: str = "x-api-key"

    def headers(self) -> dict[str, str]:
        """The headers every request of the client carries: its key, then its default headers."""
        key = {self.key_header: self.api_key} if self.api_key else {}
        return {**key, **self.default_headers}

    def changed(self, **changes: Any) -> Options:
        """These options with ``changes`` (of api_key, base_url, timeout, max_retries, default_headers)."""
        unknown = sorted(set(changes) - set(_CHANGEABLE))
        if unknown:
            raise TypeError(f"with_options() takes {', '.join(_CHANGEABLE)}; not {', '.join(unknown)}")
        # None keeps what these options have, except for timeout, where None is no limit.
        changes = {k: v for k, v in changes.items() if v is not None or k == "timeout"}
        if "base_url" in changes:
            changes["base_url"] = _root(str(changes["base_url"]))
        if "default_headers" in changes:
            changes["default_headers"] = dict(changes["default_headers"] or {})
        return replace(self, **changes)


def options(api_key: str | None, base_url: str | None, timeout: Timeout, max_retries: int,
            default_headers: Mapping[str, str] | None, key_env: tuple[str, ...] = (), url_env: tuple[str, ...] = (),
            key_header: str = "x-api-key") -> Options:
    """A client's options: those given, else the first of the ``key_env``/``url_env`` variables that is set, else
    FLOWPOOL_API_KEY and FLOWPOOL_API_URL (through flowpool's Settings, as the command line reads them).

    A base URL ending with ``/api/v1`` is taken without it (:func:`_root`)."""
    api_key = api_key or next((os.environ[n] for n in key_env if os.environ.get(n)), None)
    base_url = base_url or next((os.environ[n] for n in url_env if os.environ.get(n)), None)
    if api_key is None or base_url is None:
        from ..settings import Settings

        settings = Settings()
        api_key = api_key or settings.api_key
        base_url = base_url or settings.api_url
    if max_retries < 0:
        raise ValueError(f"max_retries must be 0 or more, not {max_retries}")
    return Options(api_key=api_key, base_url=_root(base_url or DEFAULT_BASE_URL), timeout=timeout,
                   max_retries=max_retries, default_headers=dict(default_headers or {}), key_header=key_header)


# What a base URL may end with that flowpool's routes already start with.
_API_PATH = "/api/v1"


def _root(base_url: str) -> str:
    """``base_url`` without its trailing slashes, nor ``/api/v1`` at its end: where flowpool's routes start.

    Maitai's command line and docs give its API as ``https://.../api/v1``;
    flowpool's routes carry ``/api/v1`` themselves (``/api/v1/workflows``),
    beside ``/workflow/chat/completions`` at the root.
    """
    base_url = base_url.rstrip("/")
    if base_url.endswith(_API_PATH):
        base_url = base_url[:-len(_API_PATH)].rstrip("/")
    return base_url


@dataclass(frozen=True)
class Call:
    """One request of a resource method, as either client sends it, and how its JSON answer becomes the value."""

    method: str
    path: str
    # The decoded answer -> what the method returns (an Obj, a list of them).
    result: Callable[[dict[str, Any]], Any] = Obj
    params: Optional[Mapping[str, Any]] = None
    json: Any = None
    content: Union[bytes, MultipartBody, None] = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # For this call only; None: the client's.
    timeout: Optional[Timeout] = None
    # Keyed by an Idempotency-Key: safe to send again (see the module's docstring).
    retry: bool = False

    def query(self) -> dict[str, Any] | None:
        """The query parameters that have a value (one given as None is left out, as requests does)."""
        return {k: v for k, v in self.params.items() if v is not None} if self.params else None


def idempotency_key(given: str | None = None) -> str:
    """The Idempotency-Key of one call: the one given, else a new one; the same on each try of the call."""
    return given or f"fp-{uuid.uuid4().hex}"


def invoke_body(model: str | None, params: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """An invoke's JSON body: ``model``, the inference ``params``, and the ``fields`` given (None left out; a
    preview's body, which names its script in ``params`` in place of a model, has no ``model``)."""
    named = {"model": model} if model is not None else {}
    return {**named, **params, **{name: value for name, value in fields.items() if value is not None}}


def backoff(attempt: int, retry_after: str | None, now: float | None = None) -> float | None:
    """Seconds before the next try: what the server asked for, else 0.5 s doubling; None: it asked for too long.

    ``Retry-After`` is a number of seconds or an HTTP-date (RFC 9110, 10.2.3),
    read against ``now`` (seconds since the epoch; the clock's when None).
    """
    asked = _retry_after_seconds(retry_after or "", time.time() if now is None else now)
    if asked is None:  # none, or neither form
        return min(0.5 * 2 ** attempt, MAX_RETRY_WAIT)
    return max(asked, 0.0) if asked <= MAX_RETRY_WAIT else None


def _retry_after_seconds(value: str, now: float) -> float | None:
    """A Retry-After header as seconds from ``now``; None when it is neither a number nor an HTTP-date."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 850 and asctime dates carry no zone: HTTP-dates are all GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp() - now


def retry_wait(attempt: int, max_retries: int, status: int | None,
               headers: Mapping[str, str] | None = None) -> float | None:
    """Seconds to wait before sending a keyed call again after try ``attempt`` (0 first), or None: this answer
    (or failure) is the call's. ``status`` None: no answer came (refused, or the connection dropped)."""
    if attempt >= max_retries:
        return None
    if status is None:
        return backoff(attempt, None)
    headers = headers or {}
    if status < 400 or headers.get("x-should-retry") != "true":
        return None
    return backoff(attempt, headers.get("Retry-After"))


def longer(timeout: Timeout, seconds: float) -> Timeout:
    """``timeout`` with its read part at least ``seconds`` (for a call the server holds open that long)."""
    if timeout is None:
        return None
    if isinstance(timeout, tuple):
        return timeout[0], max(timeout[1], seconds)
    return max(timeout, seconds)


def decode(status: int, headers: Mapping[str, str], content: bytes, url: str) -> dict[str, Any]:
    """The JSON object of an answer; an error status raised as its :class:`APIError`, and so is a success
    whose body is no JSON object (a proxy's HTML page, a list): every answer of the API is one."""
    try:
        body: Any = json.loads(content)
    except ValueError:
        body = content.decode("utf-8", "replace")
    if status >= 400:
        raise error_for(status, body, headers)
    if not isinstance(body, dict):
        kind = headers.get("Content-Type") or "no Content-Type"
        start = (body if isinstance(body, str) else json.dumps(body))[:200]
        raise APIError(status, {"error": {
            "type": "invalid_response",
            "message": f"{url} answered {status} with a body that is not a JSON object "
                       f"({kind}), not as flowpool's API answers: {start!r}"}}, headers)
    return body


def is_event_stream(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an answer is a server-sent event stream (else it is one JSON answer, or an error)."""
    return status < 400 and headers.get("Content-Type", "").startswith("text/event-stream")


def unfinished(url: str) -> APIConnectionError:
    """The error of an event stream that ended (its connection closed, cleanly) before its ``[DONE]``: the
    answer is not whole, whatever its last event was."""
    return APIConnectionError(f"the stream ended before its [DONE]: {url} closed the connection mid-answer", url)


def event(value: Any, headers: Mapping[str, str]) -> Obj:
    """One event of a stream as an :class:`Obj`; an error event raised as its APIError."""
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        raise error_for(code if isinstance(code, int) else 500, value, headers)
    return Obj(value)
