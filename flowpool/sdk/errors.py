"""The SDK's errors: one class per error status the API answers, and two for answers that never came.

Every error status raises its own subclass of :class:`APIError`, the names of
the official ``openai`` client's where there is one::

    APIError                      any error status (and a stream's error event)
    ├── BadRequestError           400
    ├── AuthenticationError       401
    ├── NotFoundError             404
    ├── WorkflowTimeoutError      408 (the run passed its time limit)
    ├── PayloadTooLargeError      413
    ├── UnprocessableEntityError  422 (an Idempotency-Key sent with another request)
    ├── RateLimitError            429
    ├── InternalServerError       500 (the script raised, or the run failed)
    ├── ServiceUnavailableError   503
    └── APIConnectionError        no answer: the API unreachable, or the connection broke (status_code None)
        └── APITimeoutError       no answer within the client's timeout

Both clients raise the same classes; a transport failure is chained from the
transport's own exception (``raise APIConnectionError(...) from exc``).
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, MutableMapping

__all__ = [
    "APIError", "BadRequestError", "AuthenticationError", "NotFoundError", "WorkflowTimeoutError",
    "PayloadTooLargeError", "UnprocessableEntityError", "RateLimitError", "InternalServerError",
    "ServiceUnavailableError", "APIConnectionError", "APITimeoutError",
]

# What an error shows of a body that is not the API's JSON (a proxy's HTML page, say).
_TEXT_SHOWN = 500


class Headers(MutableMapping[str, str]):
    """An answer's headers, looked up whatever their case (``error.headers["x-should-retry"]``)."""

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        for name, value in (headers or {}).items():
            self[name] = value

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __setitem__(self, name: str, value: str) -> None:
        self._items[name.lower()] = (name, value)

    def __delitem__(self, name: str) -> None:
        del self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


class APIError(Exception):
    """The API answered with an error status, or a stream ended with an error event.

    ``status_code``, ``type`` and ``message`` come from the API's
    ``{"error": {...}}`` body; ``request_id`` names the run to look up
    (``client.runs.get(request_id)``, ``flowpool logs REQUEST_ID``) when
    the error is a run's, else None; ``body`` and ``headers`` are the answer
    as it came.
    """

    def __init__(self, status_code: int | None, body: Any, headers: Mapping[str, str] | None = None) -> None:
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        self.status_code = status_code
        self.body = body
        self.headers = Headers(headers)
        message = error.get("message")
        if message is None and body not in (None, ""):
            message = body if isinstance(body, str) else json.dumps(body)
        self.message: str | None = None if message is None else str(message)[:_TEXT_SHOWN]
        self.type: str | None = error.get("type")
        # A run's error names it in the body; an answer that carries a run's id names it in the header.
        self.request_id: str | None = error.get("request_id") or self.headers.get("X-Request-Id")
        super().__init__(self._describe())

    @property
    def status(self) -> int | None:
        """The HTTP status: an alias of ``status_code``, kept for callers written before it."""
        return self.status_code

    def _describe(self) -> str:
        text = f"{self.status_code} {self.type or 'error'}: {self.message or ''}".rstrip()
        return f"{text} (request_id {self.request_id})" if self.request_id else text

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(status_code={self.status_code}, type={self.type!r}, "
                f"message={self.message!r}, request_id={self.request_id!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from what it was made of (the default would call it with its message alone).
        return type(self), (self.status_code, self.body, dict(self.headers))


class BadRequestError(APIError): ...
class AuthenticationError(APIError): ...
class NotFoundError(APIError): ...
class WorkflowTimeoutError(APIError): ...
class PayloadTooLargeError(APIError): ...
class UnprocessableEntityError(APIError): ...
class RateLimitError(APIError): ...
class InternalServerError(APIError): ...
class ServiceUnavailableError(APIError): ...


class APIConnectionError(APIError):
    """No answer came: the API could not be reached, or the connection broke before the answer was whole.

    ``status_code``, ``body`` and ``type`` are None; ``url`` is what was
    asked; ``__cause__`` is the transport's own exception.
    """

    def __init__(self, message: str, url: str | None = None) -> None:
        self.url = url
        super().__init__(None, message)  # a text body is taken as the message
        self.body = None

    def _describe(self) -> str:
        return self.message or type(self).__name__

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.message, self.url)


class APITimeoutError(APIConnectionError):
    """No answer came within the client's timeout (the connect or the read part of it)."""


_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 408: WorkflowTimeoutError,
    413: PayloadTooLargeError, 422: UnprocessableEntityError, 429: RateLimitError, 500: InternalServerError,
    503: ServiceUnavailableError,
}


def error_for(status_code: int, body: Any, headers: Mapping[str, str] | None = None) -> APIError:
    """The error of a status: its own class, or APIError for one without."""
    return _ERRORS.get(status_code, APIError)(status_code, body, headers)
