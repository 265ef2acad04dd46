"""Run one job on a worker: claim it, run the script in the sandbox, record and cache the outcome."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import flowpool
from flowpool.connections import UNREACHABLE, patiently
from flowpool.errors import NotFound, RunError, SandboxError, ScriptError, WorkerLost
from flowpool.live_calls import LiveCalls
from flowpool.quotas import token_increments
from flowpool.registry import check_output
# The redactor is the run module's: the API redacts what it records of a request with it too.
from flowpool.run import Replacements, RunEnd, RunJob, RunStatus, dumps, redact, secret_redactions
from flowpool.runs import LOG_TAIL_SECONDS
from flowpool.sandbox import RunOutcome
from flowpool.sandbox.session import StopRequest

from .calls import CallRouter
from .model_calls import RunCalls

__all__ = ["execute_run", "redact", "secret_redactions", "skipped_delivery"]

if TYPE_CHECKING:
    from .worker import WorkerRuntime

log = logging.getLogger("flowpool.worker")


# Where this worker's Python and flowpool live, longest first: an error's text
# (an ImportError names the module's file) shows them to no caller.
_HOST_PATHS = [(path, "<runtime>") for path in sorted(
    {path for path in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                       os.path.dirname(os.path.dirname(os.path.abspath(flowpool.__file__)))) if len(path) > 1},
    key=len, reverse=True)]


def skipped_delivery(runtime: WorkerRuntime, request_id: str) -> RunEnd | None:
    """What a delivery that found its run not queued any more reports: the end its caller recorded before any
    delivery started it, or None when the run is another delivery's (the message was delivered twice: the run
    is running, or ended, under that delivery's claim), which reports it. A message delivered twice for a run
    its caller ended before it started is reported by both deliveries: rare (messages are acked at once) and
    left so, since telling them apart would cost every run a write."""
    try:
        record, end = runtime.runs.outcome(request_id)
    except UNREACHABLE as exc:  # whatever it is, this delivery writes nothing of it
        log.warning("run %s is not queued any more; skipped, its state unknown (%s)", request_id, exc)
        return None
    if record is not None and end is not None and record.started_at is None:
        log.info("run %s was ended by its caller before it started (%s); skipped", request_id, end.status)
        return end
    log.info("run %s is another delivery's (%s); skipped", request_id, record.status if record else "gone")
    return None


class _Chunks:
    """The chunks a run emits and its log lines, redacted and numbered, written to its streams in batches.

    With ``keep`` the chunks are also kept, as stored, for the run's cache
    entry, so caching them costs no read of the stream back. Each flush
    writes the chunks and lines taken since the last in one round trip; one
    without lines is the chunks' write alone, so a run that logs nothing
    costs what it did before its lines were live. When lines go out is the
    run session's choice (it calls :meth:`flush`).
    """

    # A burst of emits and log lines goes out in one round trip of at most this many.
    _BATCH = 256
    # After a write Redis did not take, emits wait this long (doubling, up to the most) before the next try,
    # so an unreachable Redis costs the run one failed round trip per pause, not one per emit.
    _RETRY_AFTER = 0.5
    _RETRY_AFTER_MAX = 5.0

    def __init__(self, runtime: WorkerRuntime, request_id: str, redactions: Replacements, keep: bool) -> None:
        self.runtime, self.request_id, self.redactions = runtime, request_id, redactions
        self.kept: list[dict[str, Any]] | None = [] if keep else None
        self._emitted = self._logged = 0  # chunks and lines taken so far
        self._chunks: list[tuple[str, Any, int]] = []  # (type, content, index)
        self._lines: list[tuple[int, int, dict[str, Any], bool]] = []  # (index, chunks emitted before it, line, cut)
        self._next_try = 0.0
        self._retry_after = self._RETRY_AFTER

    def emit(self, chunk_type: str, content: Any) -> None:
        """Take one emitted chunk; a full batch goes out at once."""
        chunk_type, content = redact(chunk_type, self.redactions), redact(content, self.redactions)
        self._chunks.append((chunk_type, content, self._emitted))
        self._emitted += 1
        if self.kept is not None:
            self.kept.append({"type": chunk_type, "content": content})
        if len(self._chunks) + len(self._lines) >= self._BATCH:
            self.flush()

    def log(self, line: dict[str, Any], cut: bool) -> None:
        """Take one log line, redacted as the record keeps it (``cut``: the line saying the log was cut)."""
        self._lines.append((self._logged, self._emitted, redact(line, self.redactions), cut))
        self._logged += 1
        if len(self._chunks) + len(self._lines) >= self._BATCH:
            self.flush()

    def flush(self, until: float | None = None) -> None:
        """Write the chunks and log lines taken since the last flush, in one round trip.

        While Redis is unreachable they are kept for the next flush and
        the run goes on. The last flush passes ``until`` (a ``time.monotonic()``
        deadline): it is tried again till then, and then raises.
        """
        if not self._chunks and not self._lines:
            return
        if until is not None:
            patiently(lambda: self._write(self.runtime.redis), until, f"run {self.request_id}: writing its chunks")
        elif time.monotonic() >= self._next_try:
            try:
                # A client that gives up within a second: the run's supervisor waits on this write.
                self._write(self.runtime.redis_quick)
                self._retry_after = self._RETRY_AFTER
            except UNREACHABLE as exc:
                self._next_try = time.monotonic() + self._retry_after
                self._retry_after = min(2 * self._retry_after, self._RETRY_AFTER_MAX)
                log.warning("run %s: %d chunks and %d log lines wait for Redis: %s", self.request_id,
                            len(self._chunks), len(self._lines), exc)

    def _write(self, client: Any) -> None:
        # One script: a batch Redis did not take is written again whole; one Redis took although its answer
        # was lost is written again too, and the script skips what the streams hold already.
        self.runtime.runs.add_output(self.request_id, self._chunks, self._lines, pipe=client)
        self._chunks.clear()
        self._lines.clear()


def _reuse_key(job: RunJob) -> tuple[str, str, str, str, str] | None:
    """What a warm run process may serve this run (FLOWPOOL_SANDBOX_REUSE): the account's same workflow version.

    None for a run carrying secrets: it gets a fresh process, which ends with
    it, so its secrets reach no later run, even of the same account. The
    version's env is part of the key: the script's module runs once per
    process, with the env of that process's first run in ``os.environ``, and a
    new upload of the same script with another env keeps its version and hash.
    (The limits, the rest of the version's configuration that reaches the
    sandbox, key the process in the sandbox itself.)
    """
    if job.secrets:
        return None
    env = hashlib.sha256(json.dumps(job.env, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return (job.account, job.workflow, job.version, job.content_hash, env)


def execute_run(runtime: WorkerRuntime, job: RunJob) -> RunEnd | None:
    """Run ``job`` (built by the API) to its end; returns that end. Never raises for the script.

    The end is the one recorded (its error redacted), or, where none could be
    recorded, a ``lost`` one saying why. A run this delivery did not run (not
    queued any more: another delivery holds it, or its caller gave up on it
    before it started) is left as it is: :func:`skipped_delivery` says what
    this delivery reports, None when it is the other delivery's to report.

    A Redis that stops answering for a while costs the run nothing: the
    claim is tried again for up to FLOWPOOL_REDIS_OUTAGE_SECONDS, and the
    chunks and the outcome are kept and written once Redis is back, until
    that long past the run's hard limit (the reaper ends the run after).
    """
    request_id = job.request_id
    stop = StopRequest()  # asked by the run's caller (cancel) or its worker's shutdown
    token = uuid.uuid4().hex  # this delivery's claim: only it may write the run's end
    settings = runtime.settings
    hard_seconds = job.soft_seconds + settings.hard_timeout_grace_seconds
    claim_until = time.monotonic() + settings.redis_outage_seconds
    keep_until = time.monotonic() + hard_seconds + settings.redis_outage_seconds

    def claim() -> bool:
        """Mark the run as ours; False when the caller gave up on it meanwhile."""
        if not patiently(lambda: runtime.runs.claim(request_id, runtime.name, runtime.lease_ms, hard_seconds, token),
                         claim_until, f"run {request_id}: claiming it"):
            return False
        runtime.stops[request_id] = stop
        runtime.accounts[request_id] = job.account  # its heartbeat renews the account's slot with the lease
        runtime.active[request_id] = job.queue
        return True

    redactions = secret_redactions(job.secret_values())
    # Its calls are shown while it goes, redacted as its record keeps them; a client that gives up quickly: the
    # call waits on each write.
    calls = RunCalls(job, live=LiveCalls(runtime.redis_quick, request_id, redactions, keep_until,
                                         min(runtime.runs.ttl_ms, LOG_TAIL_SECONDS * 1000)))
    router: CallRouter | None = None
    chunks: _Chunks | None = None
    try:
        outcome = None
        try:
            script = patiently(lambda: runtime.scripts.get(job.account, job.workflow, job.version, job.content_hash),
                               claim_until, f"run {request_id}: loading its script")
        except (SyntaxError, NotFound) as exc:  # an edited Redis, or a version deleted since the request
            error: RunError | None = ScriptError(f"the workflow version could not be loaded: {exc}")
            if not claim():
                return skipped_delivery(runtime, request_id)
        else:
            chunks = _Chunks(runtime, request_id, redactions, keep=job.cache is not None and job.cache.ttl > 0)
            router = CallRouter(runtime, calls, [job.workflow], chunks.emit, on_idle=chunks.flush)
            # The claim's round trip overlaps the run process's start.
            outcome = runtime.sandbox.run(script.code, job.sandbox_view(), job.soft_seconds, on_emit=chunks.emit,
                                          source=script.source, gate=claim, on_call=router, cancel=stop,
                                          on_idle=chunks.flush, limits=runtime.limits_for(job.limits),
                                          on_log=chunks.log, reuse=_reuse_key(job))
            if outcome.skipped:
                return skipped_delivery(runtime, request_id)
            error = outcome.error
            if isinstance(error, SandboxError) and stop.reason is not None:
                error = stop.reason  # it broke off while being stopped: it ends as it was asked to
            if error is None:
                try:
                    check_output(job.output_schema, outcome.result, runtime.settings.max_json_depth, outcome.result_json)
                except RunError as exc:
                    error = exc
        try:
            # A run that failed before the sandbox opened its gate (it could not be started) is claimed now, so its
            # end is written (only a claimed run's is).
            if request_id not in runtime.active and not claim():
                return skipped_delivery(runtime, request_id)
            if chunks is not None:
                chunks.flush(until=keep_until)
            return _record_end(runtime, job, token, outcome, error, calls, router.workflow_calls if router else [],
                               router.http_calls.records() if router else [], redactions,
                               chunks.kept if chunks is not None else None, keep_until)
        except UNREACHABLE as exc:
            # Its lease lapses once it leaves runtime.active; the reaper marks it lost.
            log.error("run %s: Redis did not take its outcome until %.0fs past its hard limit (%s); the run is lost",
                      request_id, settings.redis_outage_seconds, exc)
            return RunEnd(status=RunStatus.LOST.value, version=job.version, error=WorkerLost(
                "the worker could not record the run's outcome (Redis unreachable); the run is lost").to_dict())
    finally:
        runtime.active.pop(request_id, None)
        runtime.accounts.pop(request_id, None)
        runtime.stops.pop(request_id, None)


def _record_end(runtime: WorkerRuntime, job: RunJob, claim: str, outcome: RunOutcome | None, error: RunError | None,
                calls: RunCalls, workflow_calls: list[dict[str, Any]], http_calls: list[dict[str, Any]],
                redactions: Replacements, chunks: list[dict[str, Any]] | None, until: float) -> RunEnd:
    """Write the run's end in one round trip: record, ``done`` event, cache entry, metrics; that end.

    ``http_calls`` are the entries of :meth:`HttpCalls.records <tasks.outbound.HttpCalls.records>`.
    ``chunks`` are the run's emitted chunks as stored, when it may be cached.
    The end is written only while the run is running under ``claim``, its
    delivery's token (:meth:`RunStore.finish`). While Redis is unreachable the end is written again until ``until`` (a
    ``time.monotonic()`` deadline), then the error is raised.
    """
    request_id, runs = job.request_id, runtime.runs
    status = RunStatus.for_error(error)
    usage = calls.usage()
    fields: dict[str, Any] = {"usage": usage, "model_calls": redact(calls.records, redactions),
                              "workflow_calls": redact(workflow_calls, redactions),
                              "http_calls": redact(http_calls, redactions)}
    output = content = sealed = None
    if error is None:
        assert outcome is not None
        output = outcome.result
        content = output if isinstance(output, str) else outcome.result_json
        fields["output"] = redact(output, redactions)
        if fields["output"] != output:
            # An output carrying a request secret is kept redacted; its clear form is
            # sealed for the requests holding the same secrets (flowpool.sealing).
            box = runtime.sealer.box(job.account, job.secrets)
            assert box is not None, "only a request's secrets are redacted"
            sealed = box.seal({"output": output, "content": content})
            # The text of the redacted output, not the output's text redacted: in JSON a secret may be escaped.
            output = fields["output"]
            content = output if isinstance(output, str) else dumps(output)
    else:
        scrub = [*redactions, *_HOST_PATHS]
        error.message, error.details = redact(error.message, scrub), redact(error.details, scrub)
        fields["error"] = error.to_dict()
    if outcome is not None:
        fields["logs"] = redact(outcome.logs, redactions)
        fields["logs_truncated"] = outcome.logs_truncated
        fields["chunk_count"] = outcome.chunks
    entry: dict[str, Any] | None = None
    if job.cache is not None and error is None and job.cache.ttl:
        entry = {"output": output, "content": content, "usage": usage, "version": job.version,
                 "request_id": request_id, "created_at": time.time(), "chunks": chunks or []}
        if sealed is not None:
            entry["sealed"] = sealed
    end = RunEnd(status=status.value, version=job.version, usage=usage, output=output, content=content,
                 error=fields.get("error"), reply=sealed is not None)

    def write() -> bool:
        # One transaction, so an end Redis did not take is written again whole, never in part twice.
        pipe = runtime.redis.pipeline(transaction=True)
        if job.cache is not None:
            cache_pipe = runtime.cache.pipeline(pipe)
            if entry is not None:
                runtime.cache.put(cache_pipe, job.account, job.cache.key, entry, job.cache.ttl, runs.hit_fields(
                    request_id, job.version, fields["output"], usage, len(entry["chunks"])))
            runtime.cache.release(job.account, job.cache.key, request_id, pipe=cache_pipe)
            if cache_pipe is not pipe:
                _write_cache(cache_pipe, request_id)
        if sealed is not None:
            # The stream keeps the run's final event, redacted, as long as the
            # record; every caller opens the sealed reply with its own secrets.
            runs.put_reply(pipe, request_id, sealed, runtime.settings.idempotency_window)
        finished_at = len(pipe)
        runs.finish(pipe, request_id, end, fields, claim,
                    [f"queue_runs:{job.queue}:{end.status}",
                     *(f"{record.get('kind', 'model')}_calls:{record['status']}" for record in calls.records)],
                    tokens=token_increments(calls.records))  # its account's usage
        if calls.live is not None:  # its record keeps the calls now: their live list is left a few minutes
            calls.live.expire_at_end(pipe)
        return bool(pipe.execute()[finished_at])

    if patiently(write, until, f"run {request_id}: writing its outcome"):
        return end
    # Not written now: the run has an end already. This one, when a try Redis ran lost its answer and the
    # write was tried again; or the one a waiter or the reaper gave it, taking it for lost meanwhile.
    recorded = patiently(lambda: runs.end_of(request_id), until, f"run {request_id}: reading its end")
    if recorded is not None and (recorded.status, recorded.error) == (end.status, end.error):
        return end
    log.warning("run %s: its end (%s) was not recorded: the run had been ended meanwhile (taken for lost while "
                "Redis or this worker did not answer) and keeps that end (%s)", request_id, status.value,
                recorded.status if recorded else "gone")
    return recorded or RunEnd(status=RunStatus.LOST.value, version=job.version, error=WorkerLost(
        f"its end ({status.value}) was not recorded, and the run's record is gone").to_dict())


def _write_cache(pipe: Any, request_id: str) -> None:
    """Write a run's cache entry to a cache Redis of its own, once: a cache that is away costs a miss, not the run."""
    try:
        pipe.execute()
    except UNREACHABLE as exc:
        log.warning("run %s: the cache's Redis is unreachable (%s); the result is not cached", request_id, exc)
