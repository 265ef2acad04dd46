"""``ctx.http``: outbound HTTP the worker performs for a run, inside the run's budget and the egress policy.

Every request a run makes is recorded on its record's ``http_calls``
(:class:`HttpCalls`), one entry a call::

    {"kind": "http", "method": "GET", "host": "127.0.0.1", "port": 8080, "path": "/x",
     "status_code": 200, "status": "ok", "error": None, "started_at": 1700000000.5,
     "latency_ms": 12.3, "bytes": 512, "workflow": "caller-ref"}

``path`` is the URL's path only: its query string, fragment and ``;params``
(where tokens often travel) and its userinfo are never kept, nor are they in
``error``. ``method`` is one ctx.http accepts, else ``"?"``; ``host`` and
``path`` are cut at :data:`MAX_TARGET_CHARS` characters, the cut marked "…".
``status`` is ``ok`` for any answer, a 500 included (its ``status_code`` says
which); ``error`` when none came (refused by the egress guard, no connection, a
timeout), or the call failed otherwise (a response over the size limit: its
``status_code`` is kept). ``workflow`` names the run that made the call: the
run's own workflow or one it called inline. The record keeps the first
:data:`MAX_RECORDED_HTTP_CALLS` calls, up to :data:`MAX_RECORDED_HTTP_BYTES`
of them as JSON; the rest are counted in one last entry.
"""
from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import requests

from flowpool.egress import EgressDenied, EgressPolicy, guarded_session
from flowpool.run import dumps
from flowpool.sandbox import CallErrorKind, CallFailed

__all__ = ["HttpCalls", "HttpClient", "MAX_RECORDED_HTTP_BYTES", "MAX_RECORDED_HTTP_CALLS",
           "MAX_TARGET_CHARS"]

_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}

# A run's record keeps the first this many HTTP calls; the rest are counted in one last entry, so a script that
# loops over ctx.http does not grow its record (one Redis hash field, read whole by the API) without bound.
MAX_RECORDED_HTTP_CALLS = 500
# ... and at most about this many bytes of them as JSON: past it, the calls are counted, not kept (500 entries of long
# URLs would otherwise make a record the API reads whole far larger than its output may be).
MAX_RECORDED_HTTP_BYTES = 256 << 10
# An entry's host and path are cut here (the cut marked): the timeline shows them on one line.
MAX_TARGET_CHARS = 256
# An entry's error text is cut here: the timeline shows it on one line.
_ERROR_CHARS = 300
# What of a URL quoted in an error message is never kept: its query and fragment, its userinfo.
_URL_SECRETS = re.compile(r"[?#][^\s'\"()<>]*|(?<=//)[^/\s'\"@]*@")
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")


@dataclass
class HttpCalls:
    """The HTTP calls of one run, its inline workflows' included: the first :data:`MAX_RECORDED_HTTP_CALLS` kept.

    :meth:`records` is what the run's record keeps: the entries, and past the
    cap one last entry ``{"kind": "omitted", "status": "omitted", "count": N, "note": "..."}``
    counting the calls not kept.
    """

    entries: list[dict[str, Any]] = field(default_factory=list)
    omitted: int = 0
    size: int = 0  # the kept entries' bytes, as the record stores them

    def add(self, entry: dict[str, Any], workflow: str) -> None:
        """Keep one call's entry, made by a run of ``workflow``; past either cap, only count it."""
        kept = {**entry, "workflow": workflow}
        size = len(dumps(kept).encode()) + 1  # as the record stores it, with the comma after it
        # Once one is left out, so are all after it: the record keeps the run's first calls, in order.
        if self.omitted or len(self.entries) >= MAX_RECORDED_HTTP_CALLS or self.size + size > MAX_RECORDED_HTTP_BYTES:
            self.omitted += 1
            return
        self.entries.append(kept)
        self.size += size

    def records(self) -> list[dict[str, Any]]:
        """The entries as the run's record keeps them (see the class)."""
        if not self.omitted:
            return list(self.entries)
        return [*self.entries, {"kind": "omitted", "status": "omitted", "count": self.omitted, "note": (
            f"{self.omitted} more HTTP calls were made and not recorded: a run's record keeps its first "
            f"{MAX_RECORDED_HTTP_CALLS}, up to {MAX_RECORDED_HTTP_BYTES // 1024} KiB of them")}]


def _cut(text: str | None) -> str | None:
    """``text`` as an entry keeps it: at most :data:`MAX_TARGET_CHARS` characters, a cut marked by "…"."""
    if text is None or len(text) <= MAX_TARGET_CHARS:
        return text
    return text[:MAX_TARGET_CHARS - 1] + "…"


def _target(method: Any, url: Any) -> dict[str, Any]:
    """Method, host, port and path of a request: never its query, fragment, ``;params`` or userinfo."""
    # A method ctx.http refuses is not kept as sent: it could be anything, of any length.
    name = method.upper() if isinstance(method, str) else None
    target: dict[str, Any] = {"kind": "http", "method": name if name in _METHODS else "?", "host": None,
                              "port": None, "path": None}
    if not isinstance(url, str):
        return target
    try:
        parts = urlsplit(url)
        # ";params" (a ;jsessionid=...) carry tokens as a query does: the path ends at the first ";".
        target.update(host=_cut(parts.hostname), path=_cut(parts.path.split(";", 1)[0] or "/"))
    except ValueError:  # not a URL at all (the call failed on it): nothing of it is shown
        return target
    try:
        target["port"] = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:  # a port that is no number: the rest of the URL is still worth showing
        pass
    return target


def _short_error(exc: Exception) -> str:
    """A failed call's error as its entry keeps it: one line, no query string or userinfo, at most a few hundred
    characters (requests' own messages quote the URL and urllib3's object reprs)."""
    text = exc.message if isinstance(exc, CallFailed) else f"{type(exc).__name__}: {exc}"
    errno = _ERRNO.search(text)
    if errno is not None and "ConnectionError" in text:  # what failed, not urllib3's pool and connection reprs
        text = f"ConnectionError: {errno.group(0).strip()}"
    text = _URL_SECRETS.sub("", " ".join(text.split()))
    return text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS - 1] + "…"


class HttpClient:
    """Serves the ``http`` ctx call: one request, redirects followed and each one checked."""

    def __init__(self, egress: EgressPolicy, max_response_bytes: int, connect_timeout: float = 5.0) -> None:
        self.egress = egress
        self.max_response_bytes = max_response_bytes
        self.connect_timeout = connect_timeout
        self._session = guarded_session(egress)

    def request(self, params: dict[str, Any], deadline: float,
                record: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """One request; ``record``, when given, is handed the call's entry (see the module) once it ended."""
        started_at, started = time.time(), time.monotonic()
        answer: dict[str, Any] = {"status_code": None, "bytes": 0}  # what came back, as far as it came
        error: str | None = "the call was interrupted"
        try:
            result = self._request(params, deadline, answer)
            error = None
            return result
        except Exception as exc:
            error = _short_error(exc)
            raise
        finally:
            if record is not None:
                record({**_target(params.get("method", "GET"), params.get("url")), **answer,
                        "status": "ok" if error is None else "error", "error": error, "started_at": started_at,
                        "latency_ms": round((time.monotonic() - started) * 1000, 3)})

    def _request(self, params: dict[str, Any], deadline: float, answer: dict[str, Any]) -> dict[str, Any]:
        method = str(params.get("method", "GET")).upper()
        if method not in _METHODS:
            shown = method if len(method) <= 16 else method[:15] + "…"  # it could be of any length
            raise CallFailed(CallErrorKind.HTTP, f"unsupported HTTP method {shown!r}; ctx.http sends "
                                                 f"{', '.join(sorted(_METHODS))}")
        url = params.get("url")
        if not isinstance(url, str):
            raise CallFailed(CallErrorKind.HTTP, "ctx.http needs a url string")
        remaining = deadline - time.monotonic()
        if remaining <= 0.05:
            raise CallFailed(CallErrorKind.HTTP, "the run's time budget is spent")
        timeout = params.get("timeout")
        total = min(remaining, float(timeout)) if isinstance(timeout, (int, float)) and timeout > 0 else remaining
        body = params.get("data")
        if isinstance(body, dict) and "base64" in body:
            body = base64.b64decode(body["base64"])
        try:
            self.egress.check_url(url)  # a clear error before any connection; connections check again
            response = self._session.request(
                method, url, params=params.get("params"), headers=params.get("headers"), json=params.get("json"),
                data=body, timeout=(min(self.connect_timeout, total), total), stream=True,
                allow_redirects=bool(params.get("allow_redirects", True)))
        except EgressDenied as exc:
            raise CallFailed(CallErrorKind.EGRESS, str(exc)) from exc
        except requests.TooManyRedirects as exc:
            raise CallFailed(CallErrorKind.HTTP,
                             f"more than {self._session.max_redirects} redirects from {url}") from exc
        except requests.RequestException as exc:
            cause = exc.__context__ if isinstance(exc.__context__, EgressDenied) else None
            if cause is not None:
                raise CallFailed(CallErrorKind.EGRESS, str(cause)) from exc
            raise CallFailed(CallErrorKind.HTTP, f"{type(exc).__name__}: {exc}") from exc
        answer["status_code"] = response.status_code
        with response:
            content = bytearray()
            try:
                for piece in response.iter_content(65536):
                    content += piece
                    answer["bytes"] = len(content)
                    if len(content) > self.max_response_bytes:
                        raise CallFailed(CallErrorKind.HTTP, f"the response from {response.url} is over "
                                                             f"{self.max_response_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise CallFailed(CallErrorKind.HTTP, "the run's time budget ran out while reading the response")
            except requests.RequestException as exc:
                raise CallFailed(CallErrorKind.HTTP, f"reading the response failed: {exc}") from exc
        return {
            "status_code": response.status_code, "url": response.url, "headers": dict(response.headers),
            "content_base64": base64.b64encode(bytes(content)).decode(), "encoding": response.encoding,
            "history": [r.url for r in response.history],
        }
