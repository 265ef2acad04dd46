"""The Python SDK: ``Flowpool(api_key=..., base_url=...)``.

    client = Flowpool(api_key="fp_...", base_url="http://127.0.0.1:8080")
    response = client.workflow.completions.create(model="workflow:echo", input={"text": "hi"})
    print(response.choices[0].message.content, response.output)

Answers are :class:`Obj` (attribute access over the JSON); every error status
raises its own subclass of :class:`APIError`.

Every invoke carries an ``Idempotency-Key`` (a new one per call unless given),
so the client can retry it safely: a connection that drops before the answer
(an API process restarting, say) or a 503/429 the server marks
``x-should-retry: true`` is sent again with the same key, and the server
answers from the first run instead of starting a second one. Errors of the
run itself (500, 408) are never retried.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import requests

from .sse import sse_data

__all__ = [
    "Flowpool", "Obj", "APIError", "BadRequestError", "AuthenticationError", "NotFoundError", "TimeoutError",
    "PayloadTooLargeError", "RateLimitError", "InternalServerError", "ServiceUnavailableError",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8080"


class APIError(Exception):
    """The API answered with an error status."""

    def __init__(self, status: int, body: Any, headers: Any = None) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.message = error.get("message") if isinstance(error, dict) else None
        self.type = error.get("type") if isinstance(error, dict) else None
        super().__init__(f"{status} {self.type or ''}: {self.message or body}".strip())


class BadRequestError(APIError): ...
class AuthenticationError(APIError): ...
class NotFoundError(APIError): ...
class TimeoutError(APIError): ...  # noqa: A001 - the 408 of a run, not the builtin
class PayloadTooLargeError(APIError): ...
class RateLimitError(APIError): ...
class InternalServerError(APIError): ...
class ServiceUnavailableError(APIError): ...


_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 408: TimeoutError,
    413: PayloadTooLargeError, 429: RateLimitError, 500: InternalServerError, 503: ServiceUnavailableError,
}


class Obj:
    """Attribute access over JSON: ``obj.choices[0].message.content``; ``obj.to_dict()`` for the raw data."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        try:
            return _wrap(self._data[name])
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return _wrap(self._data[name])

    def get(self, name: str, default: Any = None) -> Any:
        return _wrap(self._data.get(name, default))

    def to_dict(self) -> dict[str, Any]:
        return self._data

    def __repr__(self) -> str:
        return f"Obj({self._data!r})"


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return Obj(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class _Completions:
    def __init__(self, client: Flowpool) -> None:
        self._client = client

    def create(self, model: str, messages: list[dict[str, Any]] | None = None, input: Any = None,
               stream: bool = False, secrets: dict[str, str] | None = None, session_id: str | None = None,
               metadata: dict[str, Any] | None = None, idempotency_key: str | None = None, **params: Any) -> Any:
        """Invoke a workflow; returns the ``chat.completion`` as an :class:`Obj`.

        ``idempotency_key`` names this call across retries and processes (a
        new one is made when not given): sending it again within the
        server's window returns the same run, never a second one.
        """
        body: dict[str, Any] = {"model": model, **params}
        for name, value in (("messages", messages), ("input", input), ("secrets", secrets),
                            ("session_id", session_id), ("metadata", metadata)):
            if value is not None:
                body[name] = value
        headers = {"Idempotency-Key": idempotency_key or f"fp-{uuid.uuid4().hex}"}
        if stream:
            body["stream"] = True
            return self._client._stream("/workflow/chat/completions", body, headers)
        return Obj(self._client._decode(self._client._send_retrying("/workflow/chat/completions", body, headers)))


class _Workflow:
    def __init__(self, client: Flowpool) -> None:
        self.completions = _Completions(client)


class _Workflows:
    def __init__(self, client: Flowpool) -> None:
        self._client = client

    def upload(self, name: str, script: str | Path, accessories: dict[str, str | Path] | None = None,
               **fields: Any) -> Any:
        """Upload a script (text or path) under ``name``; returns the workflow, version and ``created``."""
        if isinstance(script, Path):
            script = script.read_text()
        files = {"script_file": ("workflow.py", script.encode())}
        for key, path in (accessories or {}).items():
            files[f"accessory_{key}"] = (Path(path).name, Path(path).read_bytes())
        data = {"workflow_ref_name": name}
        for key, value in fields.items():
            if value is not None:
                data[key] = json.dumps(value) if isinstance(value, dict) else str(value)
        return Obj(self._client._request("POST", "/api/v1/workflows/upload", data=data, files=files)["data"])

    def get(self, name: str) -> Any:
        return Obj(self._client._request("GET", f"/api/v1/workflows/{name}")["data"])

    def list(self, offset: int = 0, limit: int = 25) -> list[Any]:
        return _wrap(self._client._request("GET", "/api/v1/workflows", params={"offset": offset, "limit": limit})["data"])

    def runs(self, name: str, offset: int = 0, limit: int = 25) -> list[Any]:
        return _wrap(self._client._request("GET", f"/api/v1/workflows/{name}/runs",
                                           params={"offset": offset, "limit": limit})["data"])


class _Runs:
    def __init__(self, client: Flowpool) -> None:
        self._client = client

    def get(self, request_id: str) -> Any:
        return Obj(self._client._request("GET", f"/api/v1/runs/{request_id}")["data"])


class Flowpool:
    """A client of one flowpool API."""

    # The longest wait between two tries that a Retry-After header can ask for.
    _MAX_RETRY_WAIT = 10.0

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout: float = 660.0,
                 max_retries: int = 2) -> None:
        if api_key is None or base_url is None:
            from .settings import Settings

            settings = Settings()
            api_key = api_key or settings.api_key
            base_url = base_url or settings.api_url
        self.api_key = api_key
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.session = requests.Session()
        if api_key:
            self.session.headers["x-api-key"] = api_key
        self.workflow = _Workflow(self)
        self.workflows = _Workflows(self)
        self.runs = _Runs(self)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.session.request(method, self.base_url + path, timeout=self.timeout, **kwargs)
        return self._decode(response)

    @staticmethod
    def _decode(response: requests.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise _ERRORS.get(response.status_code, APIError)(response.status_code, body, response.headers)
        return body

    def _send_retrying(self, path: str, body: dict[str, Any], headers: dict[str, str],
                       stream: bool = False) -> requests.Response:
        """POST an invoke carrying an Idempotency-Key, again while it is safe: nothing came back, or the server says so.

        A stream is retried only until its answer starts; after that a retry would replay its events.
        """
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self.session.post(self.base_url + path, json=body, headers=headers, stream=stream,
                                             timeout=self.timeout)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                if last:
                    raise
                time.sleep(self._backoff(attempt, None))
                continue
            if last or response.status_code < 400 or response.headers.get("x-should-retry") != "true":
                return response
            response.close()
            time.sleep(self._backoff(attempt, response.headers.get("Retry-After")))
        raise AssertionError("the last try returns or raises")

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        """Seconds before the next try: what the server asked for (capped), else 0.5 s doubling."""
        try:
            asked = float(retry_after) if retry_after is not None else None
        except ValueError:
            asked = None
        return min(asked if asked is not None else 0.5 * 2 ** attempt, self._MAX_RETRY_WAIT)

    def _stream(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Iterator[Any]:
        response = self._send_retrying(path, body, headers, stream=True)
        if response.status_code >= 400 or not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            yield Obj(self._decode(response))
            return
        with response:
            for event in sse_data(response):
                if "error" in event:
                    error = event["error"]
                    raise _ERRORS.get(error.get("code"), APIError)(error.get("code", 500), event)
                yield Obj(event)
