"""One run's shape: the job a worker runs, the record kept and served, and how the run ended.

A run travels through three typed objects, each built in one place:

- :class:`RunJob` is built once, at admission (``flowpool.api.admission``),
  and crosses the broker as a JSON message (:meth:`RunJob.to_message`,
  :meth:`RunJob.from_message`). A workflow called inline gets
  :meth:`RunJob.child`; what enters the sandbox is :meth:`RunJob.sandbox_view`.
- :class:`RunRecord` is what is stored in the run's Redis hash and served by
  ``GET /api/v1/runs/{request_id}``; :class:`~flowpool.runs.RunStore` reads
  and writes it.
- :class:`RunEnd` is the outcome: the payload of the run's final ``done``
  event, which every waiter reads.

Only the store writes Redis; these classes only say what is written.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Sequence

from flowpool.errors import Cancelled, RunError, WorkerLost, run_error_from_dict
from flowpool.jsonsafe import find_problem_in
from flowpool.queues import DEFAULT_QUEUE

if TYPE_CHECKING:
    from flowpool.registry import ResolvedWorkflow
    from flowpool.sealing import Sealer

__all__ = ["ENDED", "ERRORED", "STATUSES", "UNENDED", "CachePlan", "RunEnd", "RunJob", "RunRecord", "RunStatus",
           "dumps", "encode", "redact", "secret_redactions", "secret_spellings"]


class RunStatus(str, Enum):
    """Where a run stands; stored as-is in its record."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @classmethod
    def for_error(cls, error: RunError | None) -> RunStatus:
        """The final status of a run that ended with ``error`` (None: it succeeded)."""
        if error is None:
            return cls.SUCCEEDED
        if error.status == 408:
            return cls.TIMED_OUT
        if isinstance(error, WorkerLost):
            return cls.LOST
        if isinstance(error, Cancelled):
            return cls.CANCELLED
        return cls.FAILED


# The statuses by what they say of a run, as stored (str values), for every reader that groups them.
STATUSES: tuple[str, ...] = tuple(s.value for s in RunStatus)  # all, in the order above (a filter's choices)
UNENDED = frozenset({RunStatus.QUEUED.value, RunStatus.RUNNING.value})  # no outcome yet: it may still change
ENDED = frozenset(STATUSES) - UNENDED  # final: the record will not change again
ERRORED = ENDED - {RunStatus.SUCCEEDED.value}  # ended without succeeding: what the stats count as errors


def dumps(value: Any) -> str:
    """Compact JSON, as every part of a run is stored."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class CachePlan:
    """Where a successful run's result is cached: the entry's key and how long it lives."""

    key: str
    ttl: int


@dataclass(frozen=True)
class RunJob:
    """What a worker needs to run one workflow version for one request."""

    request_id: str
    account: str
    workflow: str  # the ref name
    version: str
    content_hash: str  # of the script version: the worker's compiled-script cache key
    soft_seconds: float
    session_id: str = ""
    input: Any = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)  # travel to the worker sealed, never stored
    metadata: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # the request's inference params
    env: dict[str, str] = field(default_factory=dict)
    output_schema: dict[str, Any] | None = None
    application: str | None = None
    limits: dict[str, int] | None = None  # the workflow's own LIMITS
    cache: CachePlan | None = None
    queue: str = DEFAULT_QUEUE  # the worker queue it was sent to (flowpool.queues)

    def to_message(self, sealer: Sealer) -> dict[str, Any]:
        """The job as the JSON body of its Celery message, its secrets sealed: a message at rest holds none in clear."""
        message = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "secrets"}
        message["cache"] = {"key": self.cache.key, "ttl": self.cache.ttl} if self.cache else None
        if self.secrets:  # sealed with the job's ids: a token copied into another job does not open there
            message["sealed_secrets"] = sealer.seal({"request_id": self.request_id, "account": self.account,
                                                     "secrets": self.secrets})
        return message

    @classmethod
    def from_message(cls, message: dict[str, Any], sealer: Sealer) -> RunJob:
        """The job of a Celery message (unknown keys, from a newer sender, are passed over).

        Raises ``InvalidToken`` when its secrets were sealed by another installation's key, or for another job.
        """
        known = {f.name for f in fields(cls)} - {"secrets"}
        values = {k: v for k, v in message.items() if k in known}
        cache = values.get("cache")
        values["cache"] = CachePlan(key=cache["key"], ttl=int(cache["ttl"])) if cache else None
        job = cls(**values)
        sealed = message.get("sealed_secrets")
        if not sealed:
            return job
        opened = sealer.open(sealed)
        if (opened.get("request_id"), opened.get("account")) != (job.request_id, job.account):
            from flowpool.sealing import InvalidToken  # the server side only: it needs cryptography

            raise InvalidToken("the secrets were sealed for another job")
        return replace(job, secrets=opened["secrets"])

    def child(self, workflow: ResolvedWorkflow, soft_seconds: float, input: Any,
              messages: list[dict[str, Any]] | None) -> RunJob:
        """The job of ``workflow``, called inline by this run.

        It keeps the request's identity (account, request and session ids,
        secrets, metadata, params) and takes the callee's version, env,
        schema, application and limits; it is never cached on its own.
        """
        return replace(self, workflow=workflow.ref, version=workflow.version, content_hash=workflow.content_hash,
                       soft_seconds=soft_seconds, input=input, messages=messages if messages is not None else [],
                       env=workflow.env, output_schema=workflow.output_schema, application=workflow.application,
                       limits=workflow.limits, cache=None)

    def sandbox_view(self) -> dict[str, Any]:
        """What enters the sandbox: the fields ``ctx`` shows the script, nothing of the account or cache."""
        return {"input": self.input, "messages": self.messages, "secrets": self.secrets, "metadata": self.metadata,
                "params": self.params, "env": self.env, "session_id": self.session_id,
                "request_id": self.request_id}

    def secret_values(self) -> list[str]:
        """What to redact from what is stored: each secret long enough to, as written and as JSON or a repr escapes it.

        A secret holding a quote, a backslash or a control character appears
        escaped in JSON text and in an exception's repr (a traceback's last
        line), so those spellings are redacted too. Longest first, so a secret
        holding another is replaced whole.
        """
        return secret_spellings(self.secrets)


def secret_spellings(secrets: dict[str, Any]) -> list[str]:
    """Each of ``secrets`` long enough to redact, as written and as JSON or a repr escapes it; longest first
    (see :meth:`RunJob.secret_values`)."""
    spellings = set()
    for secret in secrets.values():
        if isinstance(secret, str) and len(secret) >= 4:
            spellings.update((secret, json.dumps(secret, ensure_ascii=False)[1:-1], json.dumps(secret)[1:-1],
                              repr(secret)[1:-1]))
    return sorted(spellings, key=len, reverse=True)


Replacements = Sequence[tuple[str, str]]  # (what to find in any string, what to put in its place), in order


def redact(value: Any, replacements: Replacements) -> Any:
    """``value`` with each replacement made in every string of it, keys included: one walk for all of them."""
    if not replacements:
        return value
    if isinstance(value, str):
        for needle, replacement in replacements:
            value = value.replace(needle, replacement)
        return value
    if isinstance(value, (list, tuple)):
        return [redact(v, replacements) for v in value]
    if isinstance(value, dict):  # keys too: ``{secret: 1}`` must not keep it
        return {redact(k, replacements): redact(v, replacements) for k, v in value.items()}
    return value


def secret_redactions(secrets: list[str]) -> list[tuple[str, str]]:
    """The replacements that hide a run's secrets (:meth:`RunJob.secret_values`)."""
    return [(secret, "[redacted]") for secret in secrets]


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: the payload of its final ``done`` event."""

    status: str
    version: str | None = None
    usage: dict[str, int] | None = None
    output: Any = None
    content: Any = None  # the chat.completion's message content: the output, as text
    error: dict[str, Any] | None = None  # RunError.to_dict()
    reply: bool = False  # the clear output waits sealed under keys.run_reply; the stream keeps it redacted

    def to_message(self) -> dict[str, Any]:
        """The end as stored in the run's stream."""
        message = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if not self.reply:
            del message["reply"]
        return message

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> RunEnd:
        """The end as read from the run's stream."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in message.items() if k in known})

    def exception(self, request_id: str) -> RunError | None:
        """The run's error, naming the request so the caller can look the run up; None if it succeeded."""
        if not self.error:
            return None
        error = run_error_from_dict(self.error)
        error.details["request_id"] = request_id
        return error


@dataclass
class RunRecord:
    """A run as stored in its Redis hash and served by the API.

    Fields are written as the run moves on (queued, claimed, finished), so
    any but the ids may still be missing. The status is stored as-is, every
    other field as JSON; secrets never are.
    """

    request_id: str
    account: str
    workflow: str
    status: str
    version: str | None = None
    session_id: str | None = None
    cache_hit: bool | None = None
    origin_request_id: str | None = None  # a cache hit's: the run that filled the entry
    worker: str | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    timeout_seconds: float | None = None
    metadata: dict[str, Any] | None = None
    # What the caller sent, redacted of the request's secrets; one over FLOWPOOL_RUN_RECORD_INPUT_BYTES is a note.
    input: Any = None
    messages: list[Any] | None = None
    output: Any = None  # redacted of the request's secrets
    usage: dict[str, int] | None = None
    error: dict[str, Any] | None = None
    model_calls: list[dict[str, Any]] | None = None
    workflow_calls: list[dict[str, Any]] | None = None
    http_calls: list[dict[str, Any]] | None = None  # the run's ctx.http requests, as the worker recorded them
    logs: list[dict[str, Any]] | None = None
    logs_truncated: bool | None = None
    chunk_count: int | None = None

    def to_fields(self) -> dict[str, str]:
        """The fields as stored (unset ones left out)."""
        return encode({name: value for name in _RECORD_NAMES if (value := getattr(self, name)) is not None})

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> RunRecord | None:
        """The record of a Redis hash, or None when there is none."""
        values = {k.decode(): v for k, v in raw.items()}
        if not _REQUIRED <= values.keys():
            return None  # nothing, or what a worker wrote after the record expired mid-run: no run to show
        return cls(**{k: v.decode() if k == "status" else _load_field(v) for k, v in values.items()
                      if k in _RECORD_FIELDS})

    def to_view(self, chunks: list[dict[str, Any]] | None = None, full: bool = True) -> dict[str, Any]:
        """The run as the API shows it: a summary, or (``full``) everything kept of it."""
        view: dict[str, Any] = {
            "request_id": self.request_id, "workflow": self.workflow, "version": self.version,
            "status": self.status, "session_id": self.session_id, "cache_hit": bool(self.cache_hit),
            "queued_at": self.queued_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "worker": self.worker,
            "timings": {
                "queued_at": self.queued_at, "started_at": self.started_at, "finished_at": self.finished_at,
                "queue_ms": _ms(self.queued_at, self.started_at), "run_ms": _ms(self.started_at, self.finished_at),
            },
            "error": self.error,
        }
        if full:
            view.update(
                output=self.output, usage=self.usage, metadata=self.metadata, timeout_seconds=self.timeout_seconds,
                origin_request_id=self.origin_request_id, input=self.input, messages=self.messages,
                model_calls=self.model_calls or [], workflow_calls=self.workflow_calls or [],
                http_calls=self.http_calls or [], logs=self.logs or [],
                logs_truncated=bool(self.logs_truncated), chunks=chunks or [],
            )
        return view


# Deeper than anything the API or a worker lets in, and far below Python's recursion limit.
_READABLE_DEPTH = 256
_UNREADABLE = {"unreadable": "this field was stored nested too deeply or with NaN/Infinity, and is not shown"}


def _load_field(raw: bytes) -> Any:
    """A stored field decoded; one that could not be shown as JSON (kept from before results were checked) is a note."""
    text = raw.decode()
    try:
        value = json.loads(text)
    except RecursionError:
        return _UNREADABLE
    return _UNREADABLE if find_problem_in(value, text, _READABLE_DEPTH) else value


_RECORD_NAMES = tuple(f.name for f in fields(RunRecord))
_RECORD_FIELDS = frozenset(_RECORD_NAMES)
_REQUIRED = frozenset(f.name for f in fields(RunRecord) if f.default is MISSING)


def encode(values: dict[str, Any]) -> dict[str, str]:
    """Record fields as stored: the status as-is, everything else as JSON, unset ones left out.

    Only :class:`RunRecord`'s fields may be written, so a misspelt field fails here, not in a reader.
    """
    unknown = set(values) - _RECORD_FIELDS
    if unknown:
        raise ValueError(f"not fields of a run record: {', '.join(sorted(unknown))}")
    return {k: (v.value if isinstance(v, RunStatus) else v) if k == "status" else dumps(v)
            for k, v in values.items() if v is not None}


def _ms(start: float | None, end: float | None) -> float | None:
    return round((end - start) * 1000, 3) if start and end else None
