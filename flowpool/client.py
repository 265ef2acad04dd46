"""The Python SDK: ``Flowpool(api_key=..., base_url=...)``.

    from flowpool import Flowpool, APIError

    client = Flowpool(api_key="fp_...", base_url="http://127.0.0.1:8080")
    try:
        response = client.workflow.completions.create(model="workflow:echo", input={"text": "hi"})
    except APIError as exc:
        print(exc.status_code, exc.type, exc.message, exc.request_id)
    else:
        print(response.choices[0].message.content, response.output)

Answers are :class:`Obj` (attribute and item access over the JSON, printed
as ``ChatCompletion(id=..., ...)``); every error status raises its own
subclass of :class:`APIError`, the names of the official ``openai`` client's
where there is one::

    APIError                      any error status (and a stream's error event)
    ├── BadRequestError           400
    ├── AuthenticationError       401
    ├── NotFoundError             404
    ├── WorkflowTimeoutError      408 (the run passed its time limit)
    ├── PayloadTooLargeError      413
    ├── UnprocessableEntityError  422 (an Idempotency-Key sent with another request)
    ├── RateLimitError            429
    ├── InternalServerError       500 (the script raised, or the run failed)
    └── ServiceUnavailableError   503

Every invoke carries an ``Idempotency-Key`` (a new one per call unless given),
so the client can retry it safely: a connection that drops before the answer
(an API process restarting, say) or a 503/429 the server marks
``x-should-retry: true`` is sent again with the same key after its
``Retry-After`` (raised at once if over 10 s: a spent budget), and the server
answers from the first run. Errors of the run (500, 408) are never retried.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import quote

import requests
from requests.structures import CaseInsensitiveDict

from .multipart import MultipartBody, Progress
from .sse import sse_data

__all__ = [
    "Flowpool", "Obj", "APIError", "BadRequestError", "AuthenticationError", "NotFoundError", "WorkflowTimeoutError",
    "PayloadTooLargeError", "UnprocessableEntityError", "RateLimitError", "InternalServerError",
    "ServiceUnavailableError",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8080"

# What an error shows of a body that is not the API's JSON (a proxy's HTML page, say).
_TEXT_SHOWN = 500


class APIError(Exception):
    """The API answered with an error status, or a stream ended with an error event.

    ``status_code``, ``type`` and ``message`` come from the API's
    ``{"error": {...}}`` body; ``request_id`` names the run to look up
    (``client.runs.get(request_id)``, ``flowpool logs REQUEST_ID``) when
    the error is a run's, else None; ``body`` and ``headers`` are the answer
    as it came.
    """

    def __init__(self, status_code: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        self.status_code = status_code
        self.body = body
        self.headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(headers or {})
        message = error.get("message")
        if message is None and body not in (None, ""):
            message = body if isinstance(body, str) else json.dumps(body)
        self.message: str | None = None if message is None else str(message)[:_TEXT_SHOWN]
        self.type: str | None = error.get("type")
        # A run's error names it in the body; an answer that carries a run's id names it in the header.
        self.request_id: str | None = error.get("request_id") or self.headers.get("X-Request-Id")
        super().__init__(self._describe())

    @property
    def status(self) -> int:
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


_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 408: WorkflowTimeoutError,
    413: PayloadTooLargeError, 422: UnprocessableEntityError, 429: RateLimitError, 500: InternalServerError,
    503: ServiceUnavailableError,
}


def _error(status_code: int, body: Any, headers: Mapping[str, str] | None = None) -> APIError:
    """The error of a status: its own class, or APIError for one without."""
    return _ERRORS.get(status_code, APIError)(status_code, body, headers)


class Obj:
    """Attribute and item access over JSON: ``obj.choices[0].message.content``; ``obj.to_dict()`` for the raw data.

    It prints as its kind and fields, ``ChatCompletion(id='chatcmpl-...', model='workflow:echo', ...)``:
    the kind is the answer's ``object`` (``chat.completion``), or what the
    client asked for (``Run``), or the key it was read under (``choices[0]``
    is a ``Choice``).
    """

    def __init__(self, data: dict[str, Any], kind: str | None = None) -> None:
        self._data = data
        self._kind = _kind_of(data) or kind or "Obj"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never a field: copy and pickle look these up before _data is set
            raise AttributeError(name)
        try:
            return _wrap(self._data[name], name)
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return _wrap(self._data[name], name)

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(k for k in self._data if k.isidentifier())})

    def get(self, name: str, default: Any = None) -> Any:
        return _wrap(self._data.get(name, default), name)

    def to_dict(self) -> dict[str, Any]:
        return self._data

    def __repr__(self) -> str:
        if all(isinstance(k, str) and k.isidentifier() for k in self._data):
            return f"{self._kind}({', '.join(f'{k}={v!r}' for k, v in self._data.items())})"
        return f"{self._kind}({self._data!r})"


def _kind_of(data: dict[str, Any]) -> str | None:
    """The class-style name of an answer's ``object`` field: ``chat.completion`` -> ``ChatCompletion``."""
    kind = data.get("object")
    if not isinstance(kind, str) or not kind:
        return None
    return "".join(part[:1].upper() + part[1:] for part in kind.replace("_", ".").split("."))


def _title(key: str) -> str:
    """``model_call`` -> ``ModelCall``."""
    return "".join(part[:1].upper() + part[1:] for part in key.split("_")) or "Obj"


def _singular(key: str) -> str:
    """What one item of a list under ``key`` is called: ``choices`` -> ``choice``, ``entries`` -> ``entry``."""
    if key.endswith("ies") and len(key) > 3:
        return key[:-3] + "y"
    return key[:-1] if key.endswith("s") and not key.endswith("ss") else key


def _wrap(value: Any, key: str | None = None) -> Any:
    """JSON with its objects as :class:`Obj`, named after ``key`` (a list's items after its singular)."""
    if isinstance(value, dict):
        return Obj(value, _title(key) if key else None)
    if isinstance(value, list):
        item = _singular(key) if key else None
        return [_wrap(v, item) for v in value]
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
        body = _body(model, params, messages=messages, input=input, secrets=secrets, session_id=session_id,
                     metadata=metadata)
        headers = {"Idempotency-Key": idempotency_key or f"fp-{uuid.uuid4().hex}"}
        if stream:
            body["stream"] = True
            return self._client._stream("/workflow/chat/completions", body, headers)
        return Obj(self._client._decode(self._client._send_retrying("/workflow/chat/completions", body, headers)))


def _body(model: str, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """An invoke's JSON body: ``model``, the inference ``params``, and the ``fields`` given (None left out)."""
    return {"model": model, **params, **{name: value for name, value in fields.items() if value is not None}}


class _Workflow:
    def __init__(self, client: Flowpool) -> None:
        self.completions = _Completions(client)
        self.runs = _WorkflowRuns(client)


class _Workflows:
    def __init__(self, client: Flowpool) -> None:
        self._client = client

    def upload(self, name: str, script: str | Path, accessories: dict[str, str | Path] | None = None,
               progress: Progress | None = None, **fields: Any) -> Any:
        """Upload a script (text or path) under ``name``; returns the workflow, version and ``created``.

        ``accessories`` maps keys to JSON files, streamed from disk as the
        body is sent; ``progress(bytes_sent, bytes_total)`` is called as it goes.
        ``fields`` are the upload's other fields (``timeout_seconds``,
        ``queue``, ``env``...); those given as None are left out.
        """
        if isinstance(script, Path):
            script = script.read_text()
        files: dict[str, tuple[str, bytes | Path]] = {"script_file": ("workflow.py", script.encode())}
        for key, path in (accessories or {}).items():
            files[f"accessory_{key}"] = (Path(path).name, Path(path))
        data = {"workflow_ref_name": name}
        for key, value in fields.items():
            if value is not None:
                data[key] = json.dumps(value) if isinstance(value, dict) else str(value)
        body = MultipartBody(data, files, progress)
        try:
            answer = self._client._request("POST", "/api/v1/workflows/upload", data=body,
                                           headers={"Content-Type": body.content_type})
        finally:
            body.close()
        return Obj(answer["data"], "WorkflowUpload")

    def get(self, name: str) -> Any:
        """The workflow ``name`` and its active version."""
        return Obj(self._client._request("GET", f"/api/v1/workflows/{name}")["data"], "Workflow")

    def list(self, offset: int = 0, limit: int = 25) -> list[Any]:
        """The account's workflows."""
        page = self._client._request("GET", "/api/v1/workflows", params={"offset": offset, "limit": limit})
        return _wrap(page["data"], "workflows")

    def runs(self, name: str, offset: int = 0, limit: int = 25) -> list[Any]:
        """The latest runs of workflow ``name``, newest first (summaries; ``client.runs.get`` has the rest)."""
        return _wrap(self._client._request("GET", f"/api/v1/workflows/{name}/runs",
                                           params={"offset": offset, "limit": limit})["data"], "runs")


class _Runs:
    def __init__(self, client: Flowpool) -> None:
        self._client = client

    def get(self, request_id: str, wait: float | None = None) -> Any:
        """Everything kept of a run: status, timings, output, error (with the script's traceback), logs, chunks, its
        webhook; with ``wait``, answered once the run ends or after ``wait`` seconds (capped by the server)."""
        timeout = self._client.timeout if wait is None else max(self._client.timeout, wait + 30)
        return Obj(self._client._request("GET", f"/api/v1/runs/{request_id}", params={"wait": wait},
                                         timeout=timeout)["data"], "Run")

    def stream(self, request_id: str, logs: bool = False) -> Iterator[Any]:
        """Follow a run from its start: each ``WorkflowChunk`` as it comes, then its ``ChatCompletion``.

        With ``logs``, each of its log lines too, as a ``WorkflowLog``
        (``level``, ``msg``, ``time``, ``fields``), in order with the chunks.
        A run that failed raises its :class:`APIError` (before the first chunk
        or after the last one), as an invoke with ``stream=True`` does.
        """
        response = self._client.session.get(f"{self._client.base_url}/api/v1/runs/{request_id}/stream",
                                            params={"logs": "true"} if logs else None, stream=True,
                                            timeout=self._client.timeout)
        return self._client._events(response)


class _WorkflowRuns(_Runs):
    """Runs started without waiting: ``create`` answers once the run is queued; ``get(request_id, wait=N)`` waits."""

    def create(self, model: str, messages: list[dict[str, Any]] | None = None, input: Any = None,
               webhook_url: str | None = None, secrets: dict[str, str] | None = None, session_id: str | None = None,
               metadata: dict[str, Any] | None = None, idempotency_key: str | None = None, **params: Any) -> Any:
        """Start a run: its ``request_id``, ``status``, ``status_url`` and ``stream_url`` (the whole run when the
        cache answered). ``webhook_url`` gets its end POSTed, signed (check it with ``flowpool.verify_webhook``)."""
        body = _body(model, params, messages=messages, input=input, secrets=secrets, session_id=session_id,
                     metadata=metadata, webhook_url=webhook_url)
        headers = {"Idempotency-Key": idempotency_key or f"fp-{uuid.uuid4().hex}"}
        return Obj(self._client._decode(self._client._send_retrying("/api/v1/runs", body, headers)), "Run")


class _Datastores:
    """The account's datastores: records searched by id, keyword (BM25) and vector (cosine)."""

    def __init__(self, client: Flowpool) -> None:
        self._client = client

    def create(self, name: str, id_field: str, text_fields: list[str], vector_field: str | None = None,
               vector_dims: int | None = None, filters: list[str] | None = None,
               embedding: dict[str, str] | None = None) -> Any:
        """Create datastore ``name``; ``embedding`` ({base_url, model, api_key_env?}) embeds queries and records."""
        spec: dict[str, Any] = {"name": name, "id_field": id_field, "text_fields": text_fields}
        for key, value in (("vector_field", vector_field), ("vector_dims", vector_dims), ("filters", filters),
                           ("embedding", embedding)):
            if value is not None:
                spec[key] = value
        return Obj(self._client._request("POST", "/api/v1/datastores", json=spec)["data"], "Datastore")

    def list(self, offset: int = 0, limit: int = 25) -> list[Any]:
        """The account's datastores."""
        page = self._client._request("GET", "/api/v1/datastores", params={"offset": offset, "limit": limit})
        return _wrap(page["data"], "datastores")

    def get(self, name: str) -> Any:
        """Datastore ``name``: its spec, ``records`` and ``version``."""
        return Obj(self._client._request("GET", _path(name))["data"], "Datastore")

    def delete(self, name: str) -> Any:
        """Delete datastore ``name`` and its records."""
        return Obj(self._client._request("DELETE", _path(name))["data"])

    def ingest(self, name: str, records: list[dict[str, Any]] | None = None, *, body: bytes | None = None,
               content_type: str = "application/json") -> Any:
        """Upsert ``records`` (or a raw ``body``: JSON array, JSONL as application/x-ndjson, CSV as text/csv).

        One request, atomic: a bad line or record is a BadRequestError naming it, and nothing of it is
        stored. ``flowpool datastore ingest`` sends a large file as batches under the server's limit.
        """
        if (records is None) == (body is None):
            raise TypeError("pass records or body, not both")
        if records is not None:
            body, content_type = json.dumps(records).encode(), "application/json"
        return Obj(self._client._request("POST", _path(name, "records"), data=body,
                                         headers={"Content-Type": content_type})["data"], "Ingested")

    def delete_records(self, name: str, ids: list[str]) -> Any:
        """Delete the records with these ids (ids not stored are skipped)."""
        return Obj(self._client._request("DELETE", _path(name, "records"),
                                         json={"ids": ids})["data"])

    def get_record(self, name: str, record_id: str) -> Any:
        """The record ``record_id`` as ingested; NotFoundError when the store has none."""
        return Obj(self._client._request("GET", _path(name, "records", record_id))["data"], "Record")

    def search(self, name: str, query: str | None = None, vector: list[float] | None = None, limit: int = 10,
               filters: dict[str, Any] | None = None) -> Any:
        """Records ranked by keyword, vector or both: ``mode`` and ``data`` [{id, score, scores, record}]."""
        body: dict[str, Any] = {"limit": limit}
        for key, value in (("query", query), ("vector", vector), ("filters", filters)):
            if value is not None:
                body[key] = value
        return Obj(self._client._request("POST", _path(name, "search"),
                                         json=body)["data"], "SearchResult")


class _Usage:
    def __init__(self, client: Flowpool) -> None:
        self._client = client

    def get(self, from_: str | None = None, to: str | None = None, group_by: str | None = None) -> Any:
        """The account's usage (GET /api/v1/usage) from ``from_`` to ``to`` (YYYY-MM-DD, UTC), by day or workflow."""
        params = {"from": from_, "to": to, "group_by": group_by}  # requests leaves out those that are None
        return Obj(self._client._request("GET", "/api/v1/usage", params=params)["data"], "Usage")


def _path(name: str, *rest: str) -> str:
    """The route of datastore ``name`` (and below it), each part quoted whole."""
    return "/".join(["/api/v1/datastores", *(quote(p, safe="") for p in (name, *rest))])


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
        self.datastores = _Datastores(self)
        self.usage = _Usage(self)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout)
        response = self.session.request(method, self.base_url + path, **kwargs)
        return self._decode(response)

    @staticmethod
    def _decode(response: requests.Response) -> dict[str, Any]:
        """The JSON object of an answer; an error status raised as its :class:`APIError`, and so is a success
        whose body is no JSON object (a proxy's HTML page, a list): every answer of the API is one."""
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise _error(response.status_code, body, response.headers)
        if not isinstance(body, dict):
            kind = response.headers.get("Content-Type") or "no Content-Type"
            start = (body if isinstance(body, str) else json.dumps(body))[:200]
            raise APIError(response.status_code, {"error": {
                "type": "invalid_response",
                "message": f"{response.url} answered {response.status_code} with a body that is not a JSON object "
                           f"({kind}), not as flowpool's API answers: {start!r}"}}, response.headers)
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
                time.sleep(self._backoff(attempt, None) or 0)
                continue
            wait = self._backoff(attempt, response.headers.get("Retry-After"))  # None: too long to wait here
            if last or response.status_code < 400 or response.headers.get("x-should-retry") != "true" or wait is None:
                return response
            response.close()
            time.sleep(wait)
        raise AssertionError("the last try returns or raises")

    def _backoff(self, attempt: int, retry_after: str | None) -> float | None:
        """Seconds before the next try: what the server asked for, else 0.5 s doubling; None: it asked for too long."""
        try:
            asked = float(retry_after or "")
        except ValueError:  # none, or not a number of seconds
            return min(0.5 * 2 ** attempt, self._MAX_RETRY_WAIT)
        return max(asked, 0.0) if asked <= self._MAX_RETRY_WAIT else None

    def _stream(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Iterator[Any]:
        yield from self._events(self._send_retrying(path, body, headers, stream=True))

    def _events(self, response: requests.Response) -> Iterator[Any]:
        """The events of a server-sent event answer as :class:`Obj`; an error event or status raised as its APIError."""
        if response.status_code >= 400 or not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            yield Obj(self._decode(response))
            return
        with response:
            for event in sse_data(response):
                error = event.get("error") if isinstance(event, dict) else None
                if isinstance(error, dict):
                    code = error.get("code")
                    raise _error(code if isinstance(code, int) else 500, event, response.headers)
                yield Obj(event)
