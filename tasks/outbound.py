"""``ctx.http``: outbound HTTP the worker performs for a run, inside the run's budget and the egress policy."""
from __future__ import annotations

import base64
import time
from typing import Any

import requests

from flowpool.egress import EgressDenied, EgressPolicy, guarded_session
from flowpool.sandbox import CallErrorKind, CallFailed

__all__ = ["HttpClient"]

_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}


class HttpClient:
    """Serves the ``http`` ctx call: one request, redirects followed and each one checked."""

    def __init__(self, egress: EgressPolicy, max_response_bytes: int, connect_timeout: float = 5.0) -> None:
        self.egress = egress
        self.max_response_bytes = max_response_bytes
        self.connect_timeout = connect_timeout
        self._session = guarded_session(egress)

    def request(self, params: dict[str, Any], deadline: float) -> dict[str, Any]:
        method = str(params.get("method", "GET")).upper()
        if method not in _METHODS:
            raise CallFailed(CallErrorKind.HTTP, f"unsupported HTTP method {method!r}")
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
        with response:
            content = bytearray()
            try:
                for piece in response.iter_content(65536):
                    content += piece
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
