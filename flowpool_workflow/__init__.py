"""What a workflow script sees: ``from flowpool_workflow import WorkflowContext``.

The sandbox runtime builds one :class:`WorkflowContext` per run and passes it
to ``execute(ctx)``. Everything a script does with the outside world goes
through it; the calls are synchronous and travel over the run's channel to
the worker.
"""
from __future__ import annotations

import base64
import json
import os
from typing import Any, BinaryIO, Iterator, Protocol

from flowpool.sandbox.protocol import CallErrorKind

__all__ = ["WorkflowContext", "WorkflowLog", "SoftTimeLimitExceeded", "WorkflowError", "ModelError", "EgressDenied", "HttpError", "WorkflowCallError",
           "HttpResponse", "DatastoreError", "NotFoundError"]


class WorkflowError(Exception):
    """A ctx call failed; the message says why."""


class ModelError(WorkflowError):
    """A model call failed on every route (the primary and each fallback); the message lists why."""


class WorkflowCallError(WorkflowError):
    """ctx.workflows.call failed: unknown workflow, bad input, a cycle, too deep, or the callee failed."""


class NotFoundError(WorkflowError):
    """What a ctx call named does not exist: an accessory key this workflow version was not uploaded with."""


class DatastoreError(WorkflowError):
    """ctx.datastore failed: no such store for this account, or a bad query (wrong vector size, unknown filter)."""


class HttpError(WorkflowError):
    """ctx.http could not get an answer (or ``raise_for_status`` saw an error status)."""


class EgressDenied(WorkflowError):
    """An outbound address is not allowed (loopback, private, link-local or metadata, unless the operator allows it)."""


class SoftTimeLimitExceeded(Exception):
    """The run reached its soft time limit. Clean up quickly: the hard limit kills the process."""


# The exception a failed ctx call raises in the script, for each kind of failure the worker reports.
CALL_ERRORS: dict[CallErrorKind, type[Exception]] = {
    CallErrorKind.MODEL: ModelError,
    CallErrorKind.EGRESS: EgressDenied,
    CallErrorKind.HTTP: HttpError,
    CallErrorKind.WORKFLOW: WorkflowCallError,
    CallErrorKind.TIMEOUT: SoftTimeLimitExceeded,
    CallErrorKind.UNSUPPORTED: WorkflowError,
    CallErrorKind.INVALID: WorkflowError,
    CallErrorKind.NOT_FOUND: NotFoundError,
    CallErrorKind.UNAVAILABLE: WorkflowError,
    CallErrorKind.DATASTORE: DatastoreError,
}


class Transport(Protocol):
    def send(self, message: dict[str, Any]) -> None: ...

    def call(self, method: str, params: dict[str, Any]) -> Any: ...

    def stream(self, method: str, params: dict[str, Any]) -> Iterator[Any]: ...

    def call_with_file(self, method: str, params: dict[str, Any]) -> tuple[Any, int | None]: ...


class _Completions:
    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def create(self, messages: list[dict[str, Any]] | None = None, intent: str | None = None,
               application: str | None = None, model: str | None = None, stream: bool = False,
               *, action_type: str | None = None, application_ref_name: str | None = None,
               session_id: str | None = None, **params: Any) -> Any:
        """A monitored model call, routed by the application's intent; an OpenAI-format dict.

        With ``stream=True``, an iterator of chunk dicts as the provider sends them.
        ``session_id`` is this call's session (its X-Flowpool-Session-Id header
        and its record's ``session_id``); without it, the run's. The other
        keywords the seed documents as Maitai's own are taken by flowpool, never
        sent to the provider, and named in the call record's ``taken_params``:
        metadata, evaluation_enabled, apply_corrections, safe_mode, callback,
        server_side_inference, fallback_config, reference_id, assistant,
        user_id, context_retrieval_enabled, context_query, fallback_model,
        execution_mode, high_performance, max_iterations and reasoning, whose
        ``effort`` is sent as ``reasoning_effort`` (unless given) and whose
        ``summary`` is taken. A ``callback`` function cannot leave the sandbox:
        it is dropped here and never called. Every other keyword argument
        (temperature, tools, response_format...) is forwarded to the provider.
        """
        request = {
            "messages": messages, "intent": intent or action_type,
            "application": application or application_ref_name, "model": model,
            "session_id": session_id, "params": _crossable(params),
        }
        if stream:
            return self._transport.stream("chat.stream", request)
        return self._transport.call("chat", request)


class _Chat:
    def __init__(self, transport: Transport) -> None:
        self.completions = _Completions(transport)


class _Workflows:
    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def call(self, ref_name: str, input: Any = None, messages: list[dict[str, Any]] | None = None) -> Any:
        """Run another workflow of this account inline, under this run's time budget; its output."""
        return self._transport.call("workflows.call", {"ref_name": ref_name, "input": input, "messages": messages})


class _Agents:
    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def create(self, agent: str, messages: list[dict[str, Any]] | None = None, *, session_id: str | None = None,
               **params: Any) -> Any:
        """Call a configured agent; an OpenAI-format dict. Monitored like a model call.

        ``session_id`` and the other keywords flowpool takes are as for
        ``ctx.chat.completions.create``; the rest are forwarded.
        """
        return self._transport.call("agents.create", {"agent": agent, "messages": messages, "session_id": session_id,
                                                      "params": _crossable(params)})


class HttpResponse:
    """An answer to ``ctx.http``: ``status_code``, ``headers``, ``content``, ``text``, ``json()``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.status_code: int = data["status_code"]
        self.url: str = data["url"]
        self.headers: dict[str, str] = data.get("headers") or {}
        self.history: list[str] = data.get("history") or []
        self.content: bytes = base64.b64decode(data.get("content_base64") or "")
        self._encoding = data.get("encoding") or "utf-8"

    @property
    def text(self) -> str:
        return self.content.decode(self._encoding, errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    def raise_for_status(self) -> None:
        if not self.ok:
            raise HttpError(f"HTTP {self.status_code} from {self.url}")

    def __repr__(self) -> str:
        return f"<HttpResponse {self.status_code} {self.url}>"


class _Http:
    """Outbound HTTP, performed by the worker with timeouts, a size cap and the egress guard."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def request(self, method: str, url: str, *, params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None, json: Any = None, data: str | bytes | None = None,
                timeout: float | None = None, allow_redirects: bool = True) -> HttpResponse:
        body: Any = data
        if isinstance(data, bytes):
            body = {"base64": base64.b64encode(data).decode()}
        return HttpResponse(self._transport.call("http", {
            "method": method, "url": url, "params": params, "headers": headers, "json": json, "data": body,
            "timeout": timeout, "allow_redirects": allow_redirects}))

    def get(self, url: str, **kwargs: Any) -> HttpResponse:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> HttpResponse:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> HttpResponse:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> HttpResponse:
        return self.request("DELETE", url, **kwargs)


class _Datastore:
    """The account's datastores, read through the worker: ``ctx.datastore.get`` and ``ctx.datastore.search``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def get(self, store: str, record_id: str | int) -> dict[str, Any] | None:
        """The record ``record_id`` of datastore ``store`` as ingested, or None when it has none (an integer id
        is its decimal string, as at ingest)."""
        return self._transport.call("datastore.get", {"store": store, "id": record_id})

    def search(self, store: str, query: str | None = None, vector: list[float] | None = None, limit: int = 10,
               filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Records of ``store`` ranked by keyword (``query``, BM25), by ``vector`` (cosine) or both (a hybrid).

        Each is ``{"id", "score", "scores": {"keyword", "vector"}, "record"}``, best first; ``filters``
        keeps records whose declared fields equal the given values.
        """
        if vector is not None:
            vector = [float(x) for x in vector]  # a numpy array or tuple travels as a JSON list
        return self._transport.call("datastore.search", {"store": store, "query": query, "vector": vector,
                                                         "limit": limit, "filters": filters})


_LEVELS = ("debug", "info", "warning", "error")


class WorkflowLog:
    """Structured log lines kept with the run: ``ctx.log.info("fetched", n=3)``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _log(self, level: str, msg: object, fields: dict[str, Any]) -> None:
        self._transport.send({"op": "log", "level": level, "msg": str(msg), "fields": _jsonable(fields)})

    def debug(self, msg: object, **fields: Any) -> None:
        self._log("debug", msg, fields)

    def info(self, msg: object, **fields: Any) -> None:
        self._log("info", msg, fields)

    def warning(self, msg: object, **fields: Any) -> None:
        self._log("warning", msg, fields)

    def error(self, msg: object, **fields: Any) -> None:
        self._log("error", msg, fields)


class WorkflowContext:
    """The runtime API of one run (see the ctx table in the product contract)."""

    def __init__(self, job: dict[str, Any], transport: Transport) -> None:
        self.input: Any = job.get("input")
        self.messages: list[dict[str, Any]] = job.get("messages") or []
        self.secrets: dict[str, str] = dict(job.get("secrets") or {})
        self.metadata: dict[str, Any] = dict(job.get("metadata") or {})
        self.params: dict[str, Any] = dict(job.get("params") or {})
        self.env: dict[str, str] = dict(job.get("env") or {})
        self.session_id: str = job.get("session_id") or ""
        self.request_id: str = job.get("request_id") or ""
        self.log = WorkflowLog(transport)
        self.chat = _Chat(transport)
        self.http = _Http(transport)
        self.workflows = _Workflows(transport)
        self.agents = _Agents(transport)
        self.datastore = _Datastore(transport)
        self._transport = transport
        self._accessories: dict[str, Any] = {}

    def load_accessory(self, key: str, fallback_path: str | None = None) -> Any:
        """The parsed JSON accessory ``key`` bundled with this workflow version; read once per run.

        The worker hands the run its cached file as an open read-only
        descriptor, read here. A key the version has none of raises
        :class:`NotFoundError` naming the keys it has, unless ``fallback_path``
        names a local JSON file to load instead (for local development).
        """
        if key in self._accessories:
            return self._accessories[key]
        try:
            _, fd = self._transport.call_with_file("accessory", {"key": key})
        except NotFoundError:
            if fallback_path is None:
                raise
            with open(fallback_path, "rb") as file:
                value = _read_json(file, f"fallback_path {fallback_path!r} of accessory {key!r}")
        else:
            if fd is None:
                raise WorkflowError(f"accessory {key!r} came without its file")
            with os.fdopen(fd, "rb") as file:
                value = _read_json(file, f"accessory {key!r}")
        self._accessories[key] = value
        return value

    def emit(self, type: str, content: Any = None) -> None:
        """Send an intermediate chunk to the caller."""
        if not isinstance(type, str) or not type:
            raise WorkflowError("emit type must be a non-empty string")
        try:
            json.dumps(content)
        except (TypeError, ValueError) as exc:
            raise WorkflowError(f"emit content is not JSON-serializable: {exc}") from exc
        self._transport.send({"op": "emit", "type": type, "content": content})

    def __repr__(self) -> str:
        return f"<WorkflowContext request_id={self.request_id!r}>"


def _crossable(params: dict[str, Any]) -> dict[str, Any]:
    """A call's keywords as they cross to the worker: a ``callback`` function (the seed's evaluation callback),
    which no JSON frame can carry, is sent as its name only, so the worker lists it as taken."""
    callback = params.get("callback")
    if callable(callback):
        return {**params, "callback": getattr(callback, "__qualname__", "function")}
    return params


def _read_json(file: BinaryIO, what: str) -> Any:
    """A JSON file parsed, its bytes let go of before parsing: a large accessory is held at most twice at once."""
    data = file.read()
    try:
        text = data.decode(json.detect_encoding(data), "surrogatepass")
        del data
        return json.loads(text)
    except ValueError as exc:
        raise WorkflowError(f"{what} is not valid JSON: {exc}") from None


def _jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    """Log fields as JSON values, falling back to repr for anything else."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        try:
            json.dumps(value)
            out[key] = value
        except (TypeError, ValueError):
            out[key] = repr(value)
    return out
