"""The SDK's resources (``client.workflow.completions``, ``client.workflows``, ``client.runs``...), for both clients.

Each method builds its request as a :class:`~flowpool.sdk.sansio.Call` and
hands it to its client: :class:`Flowpool` sends it and returns the value,
:class:`AsyncFlowpool` returns an awaitable of it. So every method here is
one of both clients, with one docstring: ``client.workflows.get(name)`` and
``await async_client.workflows.get(name)``.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Mapping, Protocol, TypeVar
from urllib.parse import quote

from ..multipart import MultipartBody, Progress
from . import sansio
from .objects import Obj, wrap
from .sansio import Call, Options, Timeout, invoke_body, longer
from .sansio import idempotency_key as _key  # the methods take an argument of its name

__all__ = ["ClientBase", "attach"]


class _Client(Protocol):
    options: Options

    def _call(self, call: Call) -> Any:
        """The value of ``call`` (async: an awaitable of it)."""

    def _stream(self, call: Call) -> Any:
        """The events of ``call`` (async: an awaitable of an async iterator of them)."""


def _data(kind: str) -> Any:
    """An answer's ``data`` as an :class:`Obj` of ``kind``."""
    return lambda answer: Obj(answer["data"], kind)


def _listed(key: str) -> Any:
    """An answer's ``data`` list, each item an :class:`Obj` named after the singular of ``key``."""
    return lambda answer: wrap(answer["data"], key)


class _Completions:
    def __init__(self, client: _Client) -> None:
        self._client = client

    def create(self, model: str, messages: list[dict[str, Any]] | None = None, input: Any = None,
               stream: bool = False, secrets: dict[str, str] | None = None, session_id: str | None = None,
               metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
               timeout: Timeout | None = None, **params: Any) -> Any:
        """Invoke a workflow; returns the ``chat.completion`` as an :class:`Obj`.

        With ``stream``, a :class:`~flowpool.sdk.client.Stream` (async: an
        :class:`~flowpool.sdk.async_client.AsyncStream`) of its
        ``workflow.chunk`` events as the script emits them, then the
        completion; an error event raised as its :class:`APIError`, a stream
        cut off before its end as an :class:`APIConnectionError`. Close one
        left before its end (``close()``, ``aclose()``, or ``with``): it holds
        its connection until then.
        ``idempotency_key`` names this call across retries and processes (a
        new one is made when not given): sending it again within the
        server's window returns the same run, never a second one.
        ``timeout`` (seconds, or a (connect, read) pair) bounds each try of
        this call in place of the client's.
        """
        body = invoke_body(model, params, messages=messages, input=input, secrets=secrets, session_id=session_id,
                           metadata=metadata)
        return _invoke(self._client, "/workflow/chat/completions", body, stream, idempotency_key, timeout)


def _invoke(client: _Client, path: str, body: dict[str, Any], stream: bool, idempotency_key: str | None,
            timeout: Timeout | None) -> Any:
    """POST an invocation ``body`` under an Idempotency-Key (so it may be sent again): its answer, or its
    stream with ``stream``."""
    if stream:
        body["stream"] = True
    call = Call("POST", path, json=body, timeout=timeout, retry=True,
                headers={"Idempotency-Key": _key(idempotency_key)})
    return client._stream(call) if stream else client._call(call)


class _Workflow:
    def __init__(self, client: _Client) -> None:
        self.completions = _Completions(client)
        self.runs = _WorkflowRuns(client)


class _Workflows:
    def __init__(self, client: _Client) -> None:
        self._client = client

    def upload(self, name: str, script: str | Path, accessories: dict[str, str | Path] | None = None,
               progress: Progress | None = None, publish_version: bool | None = None, draft: bool = False,
               **fields: Any) -> Any:
        """Upload a script (text or path) under ``name``; returns what the server answers: ``workflow``,
        ``version`` and ``created``, and the same as Maitai names it (``id``, ``workflow_ref_name``,
        ``published_version``, ``version_created``).

        ``accessories`` maps keys to JSON files, streamed from disk as the
        body is sent; ``progress(bytes_sent, bytes_total)`` is called as it goes.
        ``publish_version=False`` (or ``draft=True``) stores a new version as a
        draft, not activated: invoke it pinned, publish it with
        :meth:`activate`. ``fields`` are the upload's other fields
        (``timeout_seconds``, ``queue``, ``env``, ``version_bump``,
        ``inproc_nested_refs``...); those given as None are left out.
        """
        if isinstance(script, Path):
            script = script.read_text()
        files: dict[str, tuple[str, bytes | Path]] = {"script_file": ("workflow.py", script.encode())}
        for key, path in (accessories or {}).items():
            files[f"accessory_{key}"] = (Path(path).name, Path(path))
        if draft:
            if publish_version:
                raise TypeError("draft=True stores a draft; publish_version=True publishes: give one of them")
            publish_version = False
        data = {"workflow_ref_name": name}
        for key, value in {"publish_version": publish_version, **fields}.items():
            if value is not None:
                data[key] = _form_value(value)
        body = MultipartBody(data, files, progress)  # the client closes it once sent
        return self._client._call(Call("POST", "/api/v1/workflows/upload", _data("WorkflowUpload"), content=body,
                                       headers={"Content-Type": body.content_type}))

    def preview(self, script: str | Path, input: Any = None, messages: list[dict[str, Any]] | None = None,
                stream: bool = False, secrets: dict[str, str] | None = None, session_id: str | None = None,
                metadata: dict[str, Any] | None = None, accessories: dict[str, bytes | str | Path] | None = None,
                idempotency_key: str | None = None, timeout: Timeout | None = None, **params: Any) -> Any:
        """Run a script (text or path) once without uploading it: answered as ``workflow.completions.create``.

        The script is checked as an upload is (a BadRequestError listing each
        problem with its line) and runs as a hidden workflow of the account
        that expires. ``accessories`` maps keys to JSON, as bytes or a file's
        path. ``params`` are the invocation's other fields
        (``on_disconnect="cancel"``: a stream dropped before the end cancels the run).
        """
        if isinstance(script, Path):
            script = script.read_text()
        body = invoke_body(None, {"script": script, **params}, input=input, messages=messages, secrets=secrets,
                           session_id=session_id, metadata=metadata)
        if accessories:
            body["accessories"] = [
                {"key": key, "content_base64": base64.b64encode(
                    content if isinstance(content, bytes) else Path(content).read_bytes()).decode()}
                for key, content in accessories.items()]
        return _invoke(self._client, "/api/v1/workflows/preview", body, stream, idempotency_key, timeout)

    def get(self, name: str) -> Any:
        """The workflow ``name`` and its active version."""
        return self._client._call(Call("GET", f"/api/v1/workflows/{name}", _data("Workflow")))

    def list(self, offset: int = 0, limit: int = 25) -> Any:
        """The account's workflows."""
        return self._client._call(Call("GET", "/api/v1/workflows", _listed("workflows"),
                                       params={"offset": offset, "limit": limit}))

    def runs(self, name: str, offset: int = 0, limit: int = 25) -> Any:
        """The latest runs of workflow ``name``, newest first (summaries; ``client.runs.get`` has the rest)."""
        return self._client._call(Call("GET", f"/api/v1/workflows/{name}/runs", _listed("runs"),
                                       params={"offset": offset, "limit": limit}))

    def versions(self, ref: str, offset: int = 0, limit: int = 25) -> Any:
        """The versions of workflow ``ref``, oldest first: ``version``, ``active``, ``draft``, ``created_at``..."""
        return self._client._call(Call("GET", _workflow_path(ref, "versions"), _listed("versions"),
                                       params={"offset": offset, "limit": limit}))

    def activate(self, ref: str, version: str) -> Any:
        """Make ``version`` (``"1.2.0"``) the active one of workflow ``ref``: a rollback, a roll forward, or the
        publication of a draft (whose settings then become the workflow's); returns the workflow."""
        return self._client._call(Call("POST", _workflow_path(ref, "activate"), _data("Workflow"),
                                       json={"version": version}))

    def delete(self, ref: str) -> Any:
        """Delete workflow ``ref`` and all its versions: ``{workflow_ref_name, deleted}``."""
        return self._client._call(Call("DELETE", _workflow_path(ref), lambda answer: Obj(answer["data"])))

    def validate(self, code: str | Path, kind: str = "execute") -> Any:
        """Check a script (text or path) as an upload would, storing nothing: ``ok``, and ``errors`` (each
        problem with its line)."""
        if isinstance(code, Path):
            code = code.read_text()
        return self._client._call(Call("POST", "/api/v1/workflows/validate", _data("Validation"),
                                       json={"code": code, "kind": kind}))


class _Runs:
    def __init__(self, client: _Client) -> None:
        self._client = client

    def get(self, request_id: str, wait: float | None = None) -> Any:
        """Everything kept of a run: status, timings, output, error (with the script's traceback), logs, chunks, its
        webhook; with ``wait``, answered once the run ends or after ``wait`` seconds (capped by the server)."""
        timeout = None if wait is None else longer(self._client.options.timeout, wait + 30)
        return self._client._call(Call("GET", f"/api/v1/runs/{request_id}", _data("Run"), params={"wait": wait},
                                       timeout=timeout))

    def stream(self, request_id: str, logs: bool = False) -> Any:
        """Follow a run from its start: each ``WorkflowChunk`` as it comes, then its ``ChatCompletion``.

        With ``logs``, each of its log lines too, as a ``WorkflowLog``
        (``level``, ``msg``, ``time``, ``fields``), in order with the chunks.
        A run that failed raises its :class:`APIError` (before the first chunk
        or after the last one), as an invoke with ``stream=True`` does.
        """
        return self._client._stream(Call("GET", f"/api/v1/runs/{request_id}/stream",
                                         params={"logs": "true"} if logs else None))


class _WorkflowRuns(_Runs):
    """Runs started without waiting: ``create`` answers once the run is queued; ``get(request_id, wait=N)`` waits."""

    def create(self, model: str, messages: list[dict[str, Any]] | None = None, input: Any = None,
               webhook_url: str | None = None, secrets: dict[str, str] | None = None, session_id: str | None = None,
               metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
               timeout: Timeout | None = None, **params: Any) -> Any:
        """Start a run: its ``request_id``, ``status``, ``status_url`` and ``stream_url`` (the whole run when the
        cache answered). ``webhook_url`` gets its end POSTed, signed (check it with ``flowpool.verify_webhook``)."""
        body = invoke_body(model, params, messages=messages, input=input, secrets=secrets, session_id=session_id,
                           metadata=metadata, webhook_url=webhook_url)
        return self._client._call(Call("POST", "/api/v1/runs", lambda answer: Obj(answer, "Run"), json=body,
                                       timeout=timeout, retry=True,
                                       headers={"Idempotency-Key": _key(idempotency_key)}))


class _Datastores:
    """The account's datastores: records searched by id, keyword (BM25) and vector (cosine)."""

    def __init__(self, client: _Client) -> None:
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
        return self._client._call(Call("POST", "/api/v1/datastores", _data("Datastore"), json=spec))

    def list(self, offset: int = 0, limit: int = 25) -> Any:
        """The account's datastores."""
        return self._client._call(Call("GET", "/api/v1/datastores", _listed("datastores"),
                                       params={"offset": offset, "limit": limit}))

    def get(self, name: str) -> Any:
        """Datastore ``name``: its spec, ``records`` and ``version``."""
        return self._client._call(Call("GET", _path(name), _data("Datastore")))

    def delete(self, name: str) -> Any:
        """Delete datastore ``name`` and its records."""
        return self._client._call(Call("DELETE", _path(name), lambda answer: Obj(answer["data"])))

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
        return self._client._call(Call("POST", _path(name, "records"), _data("Ingested"), content=body,
                                       headers={"Content-Type": content_type}))

    def delete_records(self, name: str, ids: list[str]) -> Any:
        """Delete the records with these ids (ids not stored are skipped)."""
        return self._client._call(Call("DELETE", _path(name, "records"), lambda answer: Obj(answer["data"]),
                                       json={"ids": ids}))

    def get_record(self, name: str, record_id: str) -> Any:
        """The record ``record_id`` as ingested; NotFoundError when the store has none."""
        return self._client._call(Call("GET", _path(name, "records", record_id), _data("Record")))

    def search(self, name: str, query: str | None = None, vector: list[float] | None = None, limit: int = 10,
               filters: dict[str, Any] | None = None) -> Any:
        """Records ranked by keyword, vector or both: ``mode`` and ``data`` [{id, score, scores, record}]."""
        body: dict[str, Any] = {"limit": limit}
        for key, value in (("query", query), ("vector", vector), ("filters", filters)):
            if value is not None:
                body[key] = value
        return self._client._call(Call("POST", _path(name, "search"), _data("SearchResult"), json=body))


class _Usage:
    def __init__(self, client: _Client) -> None:
        self._client = client

    def get(self, from_: str | None = None, to: str | None = None, group_by: str | None = None) -> Any:
        """The account's usage (GET /api/v1/usage) from ``from_`` to ``to`` (YYYY-MM-DD, UTC), by day or workflow."""
        return self._client._call(Call("GET", "/api/v1/usage", _data("Usage"),
                                       params={"from": from_, "to": to, "group_by": group_by}))


def _form_value(value: Any) -> str:
    """One field of a multipart upload as the API reads it: a bool as true/false, a dict or list as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _workflow_path(ref: str, *rest: str) -> str:
    """The route of workflow ``ref`` (and below it), each part quoted whole."""
    return "/".join(["/api/v1/workflows", *(quote(p, safe="") for p in (ref, *rest))])


def _path(name: str, *rest: str) -> str:
    """The route of datastore ``name`` (and below it), each part quoted whole."""
    return "/".join(["/api/v1/datastores", *(quote(p, safe="") for p in (name, *rest))])


def attach(client: Any) -> None:
    """Set the resources on ``client``: ``workflow``, ``workflows``, ``runs``, ``datastores``, ``usage``."""
    client.workflow = _Workflow(client)
    client.workflows = _Workflows(client)
    client.runs = _Runs(client)
    client.datastores = _Datastores(client)
    client.usage = _Usage(client)


_Client = TypeVar("_Client", bound="ClientBase")


class ClientBase:
    """What :class:`~.client.Flowpool` and :class:`~.async_client.AsyncFlowpool` share above their transport: the
    options, read-only views of them, :meth:`with_options`, and the resources (:func:`attach`).

    A subclass names the attribute holding its connection pool (``_POOL``) and makes a new one (``_new_pool``).
    """

    # Where the key and the URL are looked up first when not given, and the header the key goes in.
    _KEY_ENV: tuple[str, ...] = ()
    _URL_ENV: tuple[str, ...] = ()
    _KEY_HEADER = "x-api-key"
    _POOL = ""
    options: Options

    def __init__(self, api_key: str | None = None, base_url: str | None = None,
                 timeout: Timeout = sansio.DEFAULT_TIMEOUT, max_retries: int = sansio.DEFAULT_MAX_RETRIES,
                 default_headers: Mapping[str, str] | None = None) -> None:
        self.options = sansio.options(api_key, base_url, timeout, max_retries, default_headers,
                                      key_env=self._KEY_ENV, url_env=self._URL_ENV, key_header=self._KEY_HEADER)
        setattr(self, self._POOL, self._new_pool())
        attach(self)

    def _new_pool(self) -> Any:
        raise NotImplementedError

    def with_options(self: _Client, **changes: Any) -> _Client:
        """A client with these options changed (api_key, base_url, timeout, max_retries, default_headers), sharing
        this one's connection pool: closing either closes it for both."""
        client = type(self).__new__(type(self))
        client.options = self.options.changed(**changes)
        setattr(client, self._POOL, getattr(self, self._POOL))
        attach(client)
        return client

    @property
    def api_key(self) -> str | None:
        return self.options.api_key

    @property
    def base_url(self) -> str:
        return self.options.base_url

    @property
    def timeout(self) -> Timeout:
        return self.options.timeout

    @property
    def max_retries(self) -> int:
        return self.options.max_retries

    @property
    def default_headers(self) -> Mapping[str, str]:
        return self.options.default_headers

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"
