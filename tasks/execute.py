"""Run one job on a worker: claim it, run the script in the sandbox, record and cache the outcome."""
from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import flowpool
from flowpool import keys
from flowpool.errors import NotFound, RunError, ScriptError
from flowpool.registry import check_output
from flowpool.run import RunEnd, RunJob, RunStatus, dumps
from flowpool.sandbox import RunOutcome

from .calls import CallRouter
from .model_calls import RunCalls

__all__ = ["execute_run", "redact"]

if TYPE_CHECKING:
    from .worker import WorkerRuntime

log = logging.getLogger("flowpool.worker")


def redact(value: Any, secrets: list[str], replacement: str = "[redacted]") -> Any:
    """``value`` with every occurrence of a secret, in any string of it (keys included), replaced."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, replacement)
        return value
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets, replacement) for v in value]
    if isinstance(value, dict):  # keys too: ``{secret: 1}`` must not keep it
        return {redact(k, secrets, replacement): redact(v, secrets, replacement) for k, v in value.items()}
    return value


# Where this worker's Python and flowpool live, longest first: an error's text
# (an ImportError names the module's file) shows them to no caller.
_HOST_PATHS = sorted({path for path in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                        os.path.dirname(os.path.dirname(os.path.abspath(flowpool.__file__))))
                      if len(path) > 1}, key=len, reverse=True)


def _skipped(request_id: str) -> str:
    log.info("run %s is not queued any more (the caller gave up); skipped", request_id)
    return "skipped"


class _Chunks:
    """The chunks a run emits, redacted and numbered, written to its stream in batches."""

    # A burst of emits goes out in one round trip of at most this many chunks.
    _BATCH = 256

    def __init__(self, runtime: WorkerRuntime, request_id: str, secrets: list[str]) -> None:
        self.runtime, self.request_id, self.secrets = runtime, request_id, secrets
        self._count = itertools.count()
        self._batch: list[tuple[str, Any, int]] = []

    def emit(self, chunk_type: str, content: Any) -> None:
        """Take one emitted chunk; a full batch goes out at once."""
        self._batch.append((redact(chunk_type, self.secrets), redact(content, self.secrets), next(self._count)))
        if len(self._batch) >= self._BATCH:
            self.flush()

    def flush(self) -> None:
        """Write the chunks emitted since the last flush, in one round trip."""
        if self._batch:
            pipe = self.runtime.redis.pipeline(transaction=False)
            for chunk_type, content, index in self._batch:
                self.runtime.runs.add_chunk(self.request_id, chunk_type, content, index=index, pipe=pipe)
            pipe.execute()
            self._batch.clear()


def execute_run(runtime: WorkerRuntime, job: RunJob) -> str:
    """Run ``job`` (built by the API) to its end; returns the final status. Never raises for the script."""
    request_id = job.request_id
    cancel = threading.Event()

    def claim() -> bool:
        """Mark the run as ours; False when the caller gave up on it meanwhile."""
        if not runtime.runs.claim(request_id, runtime.name, runtime.lease_ms):
            return False
        runtime.cancels[request_id] = cancel
        runtime.active.add(request_id)
        return True

    calls = RunCalls(job)
    secrets = job.secret_values()
    router: CallRouter | None = None
    try:
        outcome = None
        try:
            script = runtime.scripts.get(job.account, job.workflow, job.version, job.content_hash)
        except (SyntaxError, NotFound) as exc:  # an edited Redis, or a version deleted since the request
            error: RunError | None = ScriptError(f"the workflow version could not be loaded: {exc}")
            if not claim():
                return _skipped(request_id)
        else:
            chunks = _Chunks(runtime, request_id, secrets)
            router = CallRouter(runtime, calls, [job.workflow], chunks.emit, on_idle=chunks.flush)
            # The claim's round trip overlaps the run process's start.
            outcome = runtime.sandbox.run(script.code, job.sandbox_view(), job.soft_seconds, on_emit=chunks.emit,
                                          source=script.source, gate=claim, on_call=router, cancel=cancel,
                                          on_idle=chunks.flush, limits=runtime.limits_for(job.limits))
            chunks.flush()
            if outcome.skipped:
                return _skipped(request_id)
            error = outcome.error
            if error is None:
                try:
                    check_output(job.output_schema, outcome.result, runtime.settings.max_json_depth)
                except RunError as exc:
                    error = exc
        return _record_end(runtime, job, outcome, error, calls, router.workflow_calls if router else [], secrets)
    finally:
        runtime.active.discard(request_id)
        runtime.cancels.pop(request_id, None)


def _record_end(runtime: WorkerRuntime, job: RunJob, outcome: RunOutcome | None, error: RunError | None,
                calls: RunCalls, workflow_calls: list[dict[str, Any]], secrets: list[str]) -> str:
    """Write the run's end in one round trip: record, ``done`` event, cache entry, metrics; the final status."""
    request_id, runs = job.request_id, runtime.runs
    status = RunStatus.for_error(error)
    usage = calls.usage()
    fields: dict[str, Any] = {"usage": usage, "model_calls": redact(calls.records, secrets),
                              "workflow_calls": redact(workflow_calls, secrets)}
    output = content = None
    if error is None:
        assert outcome is not None
        output = outcome.result
        content = output if isinstance(output, str) else outcome.result_json
        fields["output"] = redact(output, secrets)
    else:
        error.message = redact(redact(error.message, secrets), _HOST_PATHS, "<runtime>")
        error.details = redact(redact(error.details, secrets), _HOST_PATHS, "<runtime>")
        fields["error"] = error.to_dict()
    end = RunEnd(status=status.value, version=job.version, usage=usage, output=output, content=content,
                 error=fields.get("error"))
    if outcome is not None:
        fields["logs"] = redact(outcome.logs, secrets)
        fields["logs_truncated"] = outcome.logs_truncated
        fields["chunk_count"] = outcome.chunks
    pipe = runtime.redis.pipeline(transaction=False)
    # An output carrying a request secret is kept redacted; its clear form is
    # sealed for the requests holding the same secrets (flowpool.sealing).
    sealed = None
    if error is None and fields["output"] != output:
        box = runtime.sealer.box(job.account, job.secrets)
        assert box is not None, "only a request's secrets are redacted"
        sealed = box.seal({"output": output, "content": content})
        # The text of the redacted output, not the output's text redacted: in JSON a secret may be escaped.
        output = fields["output"]
        content = output if isinstance(output, str) else dumps(output)
    if job.cache is not None:
        if error is None and job.cache.ttl:
            entry = {"output": output, "content": content, "usage": usage, "version": job.version,
                     "request_id": request_id, "created_at": time.time(),
                     "chunks": runs.chunks(request_id) if outcome and outcome.chunks else []}
            if sealed is not None:
                entry["sealed"] = sealed
            runtime.cache.put(pipe, job.account, job.cache.key, entry, job.cache.ttl, runs.hit_fields(
                request_id, job.version, fields["output"], usage, len(entry["chunks"])))
        runtime.cache.release(job.account, job.cache.key, request_id, pipe=pipe)
    if sealed is not None:
        # The stream keeps the run's final event, redacted, as long as the
        # record; every caller opens the sealed reply with its own secrets.
        runs.put_reply(pipe, request_id, sealed)
        end = replace(end, output=output, content=content, reply=True)
    runs.finish(pipe, request_id, end, fields)
    for record in calls.records:
        pipe.hincrby(keys.METRICS, f"{record.get('kind', 'model')}_calls:{record['status']}", 1)
    pipe.execute()
    return status.value
