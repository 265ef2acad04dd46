"""What the worker and a run process say to each other, and the types a sandbox's caller handles.

Stdlib only: the in-sandbox side (:mod:`.runtime`, :mod:`flowpool_workflow`)
imports this module as well as the worker's side, so the error kinds of ctx
calls and of runs are written down once.

The run's channel carries one JSON object per frame (see :mod:`.channel`);
every object has an ``op``. A run process takes one job, or, kept warm, one job after another:

  worker -> run   {"op": "run", "code": <base64 marshal>, "source", "job": {...}, "soft_seconds": s,
                   "cpu_seconds": n, "reuse": true (only when the process may be kept for another run)}
  run -> worker   any number of
                    {"op": "emit", "type", "content"}           a chunk for the caller
                    {"op": "log", "level", "msg", "fields"}     a log line of the run
                    {"op": "call", "id", "method", "params"}    a ctx call, answered by the worker with
                      {"op": "reply", "id", "value"}
                      | {"op": "reply", "id", "value", "fds": n}  with n open descriptors attached (SCM_RIGHTS)
                      | {"op": "chunk", "id", "value"}... then {"op": "reply", "id", "end": true}
                      | {"op": "reply", "id", "error": {"kind": <CallErrorKind>, "message"}}
                  then exactly one
                    {"op": "result", "value"}
                    | {"op": "error", "kind": <RunErrorKind>, "type", "message", "traceback"}
                  then, only for a run asked to ``reuse``, once it has tidied up (:mod:`.reuse`)
                    {"op": "ready"}
                  or it exits instead (as every run process not asked to ``reuse`` does). The answer
                  comes first, so tidying never counts against the run's time; the worker waits
                  for ``ready`` a short while off the caller's path, then stops the process and
                  checks it from /proc before it keeps it (:mod:`.warm`): ``ready`` says the
                  tidying is done, never that the process is clean. A kept process waits, stopped,
                  for the next ``run`` frame (it is continued first), or for the worker to end it.

A reply with ``fds`` hands the run read-only files (an accessory: :class:`WithFile`): the descriptors
travel as ancillary data of the frame's first bytes, so the run reads with ``recvmsg``; a file's bytes never
cross the channel. The worker reads with a plain ``recv``, which drops any descriptor a run sends it.

A call is answered before the run makes the next one; the run passes over
answers to an earlier call that its soft limit interrupted (their ``id`` is
not the one it waits for). The worker answers a call that fails once the
run's soft limit has passed with the ``timeout`` kind, whatever failed, so
the script sees its time limit rather than an error it may not expect.

A run that ends in ``error`` says why in its ``kind`` (:class:`RunErrorKind`):
the script raised, the soft limit interrupted it, or its result is not JSON.
The worker takes ``timeout``, and any error once the soft limit has passed,
as the time limit; every other kind as the script's own failure.

The worker kills the run at its hard limit, on a frame over the size limit,
on one that is not a JSON object with an ``op``, or on an ``op`` it does not
know; the run's outcome then says why (:class:`RunOutcome`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # the in-sandbox side must not import the worker's errors
    from flowpool.errors import RunError

__all__ = ["CallErrorKind", "CallFailed", "CallHandler", "RunErrorKind", "RunOutcome", "SandboxLimits", "Streamed",
           "WithFile", "cpu_budget"]


class CallErrorKind(str, Enum):
    """Why a ctx call failed, as it crosses the run's channel; :mod:`flowpool_workflow` maps each to an exception."""

    MODEL = "model"  # every route of a model or agent call failed
    EGRESS = "egress"  # the egress policy refused an address
    HTTP = "http"  # ctx.http got no usable answer
    WORKFLOW = "workflow"  # ctx.workflows.call could not run its callee, or the callee failed
    TIMEOUT = "timeout"  # the run's soft limit passed while the call was served
    UNSUPPORTED = "unsupported"  # this worker serves no such call
    INVALID = "invalid"  # the call is malformed
    NOT_FOUND = "not_found"  # what the call names does not exist (an accessory key the version has not)
    UNAVAILABLE = "unavailable"  # what the call names exists but could not be fetched (the blob store failed)
    DATASTORE = "datastore"  # ctx.datastore: no such store for this account, or a bad query


class RunErrorKind(str, Enum):
    """Why a run ended in an ``error`` instead of a ``result``, as it crosses the run's channel."""

    SCRIPT = "script"  # the script raised (SystemExit included)
    TIMEOUT = "timeout"  # the soft limit's SoftTimeLimitExceeded ended the script
    RESULT = "result"  # execute() returned a value that is not JSON-serializable


class CallFailed(Exception):
    """A ctx call the worker could not serve; the script gets ``kind`` and ``message``.

    ``kind`` may be given as its string value; one that is no
    :class:`CallErrorKind` raises ValueError, being a mistake of the caller.
    """

    def __init__(self, kind: CallErrorKind | str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = CallErrorKind(kind), message


@dataclass
class Streamed:
    """What a ctx call handler returns to answer with a stream of chunks."""

    chunks: Iterator[Any]


@dataclass
class WithFile:
    """What a ctx call handler returns to answer with a value and an open file (an accessory).

    ``fd`` is a read-only descriptor the session sends with the reply
    (SCM_RIGHTS) and then closes: the handler hands it over on return.
    """

    value: Any
    fd: int


# on_call(method, params, deadline) -> a JSON value, Streamed or WithFile; deadline is on the monotonic clock.
CallHandler = Callable[[str, dict, float], Any]


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run process."""

    memory_bytes: int = 512 << 20
    processes: int = 32
    open_files: int = 64
    file_bytes: int = 64 << 20
    tmp_bytes: int = 64 << 20
    cpu_seconds: int | None = None  # None: the time limit's own backstop
    max_result_bytes: int = 2 << 20
    max_log_bytes: int = 256 << 10
    max_chunks: int = 10_000
    max_chunk_bytes: int = 64 << 10
    max_json_depth: int = 64  # of an emitted chunk's content and of log fields, as of a request body


def cpu_budget(wall_seconds: float, limit: int | None) -> int:
    """CPU seconds a run may use: its own ``limit``, within a backstop just past ``wall_seconds`` (whole seconds).

    Without a limit of its own, a run may use a CPU for as long as it may
    run at all: the worker starts each run process under the backstop for
    the longest run, and the run lowers it to its own once it knows its job.
    """
    backstop = int(wall_seconds) + 1
    return min(backstop, limit or backstop)


@dataclass
class RunOutcome:
    """What a run produced: a result or an error, plus its logs."""

    result: Any = None
    result_json: str | None = None
    error: RunError | None = None  # the script's, a limit's, the sandbox's, or why the run was stopped
    logs: list[dict[str, Any]] = field(default_factory=list)
    logs_truncated: bool = False
    chunks: int = 0
    pid: int | None = None
    skipped: bool = False  # the gate closed: the run was killed before it was followed

    @property
    def ok(self) -> bool:
        return self.error is None
