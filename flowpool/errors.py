"""The one error tree of flowpool, and what each client-facing error means in HTTP.

    FlowpoolError                      500 internal_error
    ├── RequestError                   400 invalid_request_error
    │   ├── MalformedJSON              400 invalid_request_error
    │   ├── InputSchemaError           400 invalid_request_error
    │   ├── RequestTimeout             408 request_timeout (the body did not arrive in time)
    │   ├── IdempotencyKeyReused       422 idempotency_key_reused (the key named another request)
    │   └── ValidationFailed           400 script_validation_error (script rules; carries [{line, message}])
    ├── AuthenticationError            401 authentication_error
    ├── PermissionDenied               403 permission_denied (an operator route asked from outside loopback)
    ├── NotFound                       404 not_found
    │   ├── WorkflowNotFound           404 invalid_request_error (the seed's "Workflow not found: <ref>")
    │   └── DatastoreNotFound          404 not_found (no such datastore for this account)
    ├── Conflict                       409 conflict (a datastore that exists; a draft upload of a published
    │                                  version's content: reason version_published)
    ├── PayloadTooLarge                413 payload_too_large
    ├── QuotaExceeded                  429 rate_limit_exceeded
    ├── Unavailable                    503 service_unavailable
    │   ├── DatastoreCatchingUp        503 service_unavailable (the caller's deadline came while a replica was
    │   │                              brought up to date)
    │   └── BlobStoreUnavailable       503 service_unavailable (flowpool.blobs: the blob store failed a request)
    ├── UpstreamError                  502 upstream_error (an endpoint called for the request failed)
    ├── RunError                       500 internal_error: errors of a run, stored on its record
    │   ├── TimeLimitExceeded          408 timeout
    │   ├── ScriptError                500 script_error
    │   ├── OutputSchemaError          500 output_schema_error
    │   ├── ResultTooLarge             413 payload_too_large
    │   ├── InvalidResult              500 invalid_result (too deep, or not valid JSON)
    │   ├── SandboxError               500 sandbox_error
    │   ├── MemoryLimitExceeded        500 memory_limit (all the run's processes together)
    │   ├── WorkerLost                 500 worker_lost
    │   ├── Cancelled                  499 cancelled (the caller went away and asked for it)
    │   ├── RunNotStarted              503 service_unavailable (dropped before it started: safe to retry)
    │   └── OutcomeUnavailable         503 service_unavailable (the run went on; its outcome could not be read)
    └── ConfigurationError             500 internal_error: raised at start-up, never rendered

The API registers one handler on :class:`FlowpoolError` and renders
``{"error": {"message", "type", "code"}}`` from ``status`` and ``type``.
Run errors travel from the worker to the API as plain dicts
(:meth:`RunError.to_dict` / :func:`run_error_from_dict`), named by class:
every subclass of :class:`RunError` registers itself under its name as it is
defined, so a new one travels without being listed anywhere.

``retry_safe`` says whether sending the same request again could run the
script a second time: true only where nothing ran (the answer carries
``x-should-retry``, the header the official OpenAI clients obey).
"""
from __future__ import annotations

from typing import Any


class FlowpoolError(Exception):
    """Root of every error flowpool raises on purpose."""

    status: int = 500
    type: str = "internal_error"
    retry_safe: bool = False  # True only where nothing ran, so a retry cannot run the script twice

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message or self.__class__.__doc__ or self.type
        self.details = details

    def to_body(self) -> dict[str, Any]:
        """The JSON body the API answers with."""
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.status}
        error.update(self.details)
        return {"error": error}


class ConfigurationError(FlowpoolError):
    """A setting is missing or inconsistent."""


class RequestError(FlowpoolError):
    """The request is malformed."""

    status = 400
    type = "invalid_request_error"


class MalformedJSON(RequestError):
    """The body is not valid JSON."""


class InputSchemaError(RequestError):
    """The input breaks the workflow's INPUT_SCHEMA."""


class RequestTimeout(RequestError):
    """The request body did not arrive in full in time (or was shorter than its Content-Length)."""

    status = 408
    type = "request_timeout"


class IdempotencyKeyReused(RequestError):
    """The Idempotency-Key was first sent with a different request; it names that request's run."""

    status = 422
    type = "idempotency_key_reused"


class ValidationFailed(RequestError):
    """The script breaks the workflow rules; ``errors`` lists them with line numbers."""

    type = "script_validation_error"


class AuthenticationError(FlowpoolError):
    """The API key is missing or unknown."""

    status = 401
    type = "authentication_error"


class PermissionDenied(FlowpoolError):
    """The caller may not use this route from where it asks (an operator route, no admin token, not loopback)."""

    status = 403
    type = "permission_denied"


class NotFound(FlowpoolError):
    """No such resource for this account."""

    status = 404
    type = "not_found"


class WorkflowNotFound(NotFound):
    """No such workflow, or no such version of it, for this account.

    Answered as the seed answers (``"Workflow not found: <ref>"``, type
    ``invalid_request_error``), so code written for it keeps working; flowpool's
    own ``reason`` (``workflow_not_found`` or ``version_not_found``) and a
    longer ``detail`` ride beside. A workflow of another account reads the
    same as one that exists nowhere.
    """

    type = "invalid_request_error"

    def __init__(self, ref: str, version: str | None = None) -> None:
        if version is None:
            # The detail leaves the name out: everything beside the message reads the same for any ref.
            super().__init__(f"Workflow not found: {ref}", reason="workflow_not_found",
                             detail="this account has no workflow of that name (workflows are per account); "
                                    "GET /api/v1/workflows lists them")
        else:
            super().__init__(f"Workflow not found: {ref}@{version}", reason="version_not_found",
                             detail=f"workflow {ref!r} has no version {version!r}; "
                                    f"GET /api/v1/workflows/{ref}/versions lists them")


class DatastoreNotFound(NotFound):
    """No datastore of that name for this account; another account's store reads the same."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Datastore not found: {name}", reason="datastore_not_found",
                         detail="this account has no datastore of that name (datastores are per account); "
                                "GET /api/v1/datastores lists them")


class Conflict(FlowpoolError):
    """The resource already exists, or the request clashes with its current state."""

    status = 409
    type = "conflict"


class PayloadTooLarge(FlowpoolError):
    """A body, input or result is over its size limit."""

    status = 413
    type = "payload_too_large"


class QuotaExceeded(FlowpoolError):
    """The account is over a quota: nothing was queued, and a retry after ``retry_after`` seconds may pass."""

    status = 429
    type = "rate_limit_exceeded"
    retry_safe = True

    def __init__(self, message: str = "", retry_after: int | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after


class Unavailable(FlowpoolError):
    """The broker or the workers cannot take the request; nothing was started."""

    status = 503
    type = "service_unavailable"
    retry_safe = True
    retry_after = 5


class DatastoreCatchingUp(Unavailable):
    """The caller's deadline came while this host's replica of a datastore was being brought up to date.

    Only reads given a deadline raise it (ctx.datastore: the run's); the API's reads have none. What was applied
    stays applied, so the next read goes on from there.
    """

    def __init__(self, name: str, applied: int | None = None, head: int | None = None) -> None:
        progress = f" (batch {applied} of {head} applied)" if head else ""
        super().__init__(f"datastore {name!r} is still being brought up to date on this worker{progress} and the "
                         "time ran out; what was applied stays, a later read goes on from there")


class UpstreamError(FlowpoolError):
    """An endpoint flowpool called for this request (a datastore's embedding endpoint) failed or refused."""

    status = 502
    type = "upstream_error"


# Every subclass of RunError by its class name, as it travels in a run error's "kind".
_RUN_ERRORS: dict[str, type[RunError]] = {}


class RunError(FlowpoolError):
    """A run ended in error; the worker records it and the API renders it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__ in _RUN_ERRORS:
            # The name is what travels: two classes of one name would come back as the same one.
            raise TypeError(f"a run error named {cls.__name__} exists already ({_RUN_ERRORS[cls.__name__].__module__})")
        _RUN_ERRORS[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        """The error as it travels to the API: ``{"kind": class name, "message", **details}``."""
        return {"kind": type(self).__name__, "message": self.message, **self.details}


class TimeLimitExceeded(RunError):
    """The run passed its time limit."""

    status = 408
    type = "timeout"


class ScriptError(RunError):
    """The workflow script raised."""

    type = "script_error"


class OutputSchemaError(RunError):
    """The result breaks the workflow's OUTPUT_SCHEMA."""

    type = "output_schema_error"


class ResultTooLarge(RunError):
    """The result is over the configured size limit."""

    status = 413
    type = "payload_too_large"


class InvalidResult(RunError):
    """The result cannot be shown as JSON: nested too deeply, or holding NaN, Infinity or a lone surrogate."""

    type = "invalid_result"


class SandboxError(RunError):
    """The sandbox process crashed or broke the protocol."""

    type = "sandbox_error"


class MemoryLimitExceeded(RunError):
    """The run's processes together used more than its memory limit; it was killed."""

    type = "memory_limit"


class WorkerLost(RunError):
    """The worker running the request stopped answering."""

    type = "worker_lost"


class Cancelled(RunError):
    """The caller went away and asked for the run to be stopped."""

    status = 499
    type = "cancelled"


class RunNotStarted(RunError):
    """No worker started the run in time; it was dropped before it did anything."""

    status = 503
    type = "service_unavailable"
    retry_safe = True
    retry_after = 5


class OutcomeUnavailable(RunError):
    """The run was handed to the workers, but its outcome could not be read in time (Redis unreachable).

    It may have finished or still be running: look it up by its request id.
    Not safe to retry without an Idempotency-Key, which joins the same run.
    """

    status = 503
    type = "service_unavailable"
    retry_after = 5


def run_error_from_dict(data: dict[str, Any]) -> RunError:
    """Rebuild a run error recorded by a worker; one of an unknown kind comes back as a SandboxError."""
    data = dict(data)
    cls = _RUN_ERRORS.get(data.pop("kind", ""), SandboxError)
    message = data.pop("message", "")
    return cls(message, **data)


__all__ = [
    "AuthenticationError",
    "Cancelled",
    "ConfigurationError",
    "Conflict",
    "DatastoreNotFound",
    "FlowpoolError",
    "IdempotencyKeyReused",
    "InputSchemaError",
    "InvalidResult",
    "MalformedJSON",
    "MemoryLimitExceeded",
    "NotFound",
    "OutcomeUnavailable",
    "OutputSchemaError",
    "PayloadTooLarge",
    "PermissionDenied",
    "QuotaExceeded",
    "RequestError",
    "RequestTimeout",
    "ResultTooLarge",
    "RunError",
    "RunNotStarted",
    "SandboxError",
    "ScriptError",
    "TimeLimitExceeded",
    "Unavailable",
    "UpstreamError",
    "ValidationFailed",
    "WorkerLost",
    "WorkflowNotFound",
    "run_error_from_dict",
]
