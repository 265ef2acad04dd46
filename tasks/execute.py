"""Run one job on a worker: claim it, run the script in the sandbox, record and cache the outcome."""
from __future__ import annotations

import itertools
import logging
import marshal
import threading
import time
from collections import OrderedDict
from typing import Any, NamedTuple

from flowpool import keys
from flowpool.errors import NotFound, RunError, ScriptError
from flowpool.registry import Registry, check_output
from flowpool.runs import RunStatus
from .calls import CallRouter
from .models import RunCalls

__all__ = ["CompiledScript", "ScriptCache", "execute_run", "redact"]

log = logging.getLogger("flowpool.worker")


class CompiledScript(NamedTuple):
    code: bytes  # marshalled code object
    source: str  # for the tracebacks of the run


class ScriptCache:
    """Compiled script versions kept warm in a worker, by content hash (LRU)."""

    def __init__(self, registry: Registry, size: int) -> None:
        self.registry = registry
        self.size = size
        self._code: OrderedDict[str, CompiledScript] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, account_id: str, ref: str, version: str, content_hash: str) -> CompiledScript:
        """The compiled script of a version, compiled on first use."""
        with self._lock:
            code = self._code.get(content_hash)
            if code is not None:
                self._code.move_to_end(content_hash)
                return code
        source = self.registry.load_script(account_id, ref, version)
        code = CompiledScript(marshal.dumps(compile(source, "workflow.py", "exec", dont_inherit=True)), source)
        with self._lock:
            self._code[content_hash] = code
            while len(self._code) > self.size:
                self._code.popitem(last=False)
        return code


def redact(value: Any, secrets: list[str]) -> Any:
    """``value`` with every secret string replaced by ``[redacted]``."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "[redacted]")
        return value
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    return value


def _skipped(request_id: str) -> str:
    log.info("run %s is not queued any more (the caller gave up); skipped", request_id)
    return "skipped"


def execute_run(runtime: Any, job: dict[str, Any]) -> str:
    """Run ``job`` (built by the API) to its end; returns the final status. Never raises for the script."""
    request_id = job["request_id"]
    runs = runtime.runs

    cancel = threading.Event()

    def claim() -> bool:
        """Mark the run as ours; False when the caller gave up on it meanwhile."""
        if not runs.claim(request_id, runtime.name, runtime.lease_ms):
            return False
        runtime.cancels[request_id] = cancel
        runtime.active.add(request_id)
        return True

    secrets = [s for s in (job.get("secrets") or {}).values() if isinstance(s, str) and len(s) >= 4]
    calls = RunCalls(account_id=job["account"], request_id=request_id, session_id=job.get("session_id") or "",
                     messages=job.get("messages") or [], secrets=job.get("secrets") or {},
                     application=job.get("application"))
    router: CallRouter | None = None
    try:
        outcome = None
        try:
            script = runtime.scripts.get(job["account"], job["workflow"], job["version"], job["content_hash"])
        except (SyntaxError, NotFound) as exc:  # an edited Redis, or a version deleted since the request
            error: RunError | None = ScriptError(f"the workflow version could not be loaded: {exc}")
            if not claim():
                return _skipped(request_id)
        else:
            sandbox_job = {k: job.get(k) for k in
                           ("input", "messages", "secrets", "metadata", "params", "env", "session_id", "request_id")}

            emitted = itertools.count()
            batch: list[tuple[str, Any, int]] = []

            def flush() -> None:
                """Write the chunks emitted since the last flush, in one round trip."""
                if batch:
                    pipe = runtime.redis.pipeline(transaction=False)
                    for chunk_type, content, index in batch:
                        runs.add_chunk(request_id, chunk_type, content, index=index, pipe=pipe)
                    pipe.execute()
                    batch.clear()

            def on_emit(chunk_type: str, content: Any) -> None:
                batch.append((chunk_type, redact(content, secrets), next(emitted)))
                if len(batch) >= 256:
                    flush()

            router = CallRouter(runtime, job, calls, [job["workflow"]], on_emit, on_idle=flush)

            # The claim's round trip overlaps the run process's start.
            outcome = runtime.sandbox.run(script.code, sandbox_job, job["soft_seconds"], on_emit=on_emit,
                                          source=script.source, gate=claim, on_call=router, cancel=cancel,
                                          on_idle=flush, limits=runtime.limits_for(job.get("limits")))
            flush()
            if outcome.skipped:
                return _skipped(request_id)
            error = outcome.error
            if error is None:
                try:
                    check_output(job.get("output_schema"), outcome.result)
                except RunError as exc:
                    error = exc
        status = RunStatus.for_error(error)
        usage = calls.usage()
        done: dict[str, Any] = {"status": status.value, "version": job["version"], "usage": usage}
        fields: dict[str, Any] = {"usage": usage, "model_calls": redact(calls.records, secrets),
                                  "workflow_calls": redact(router.workflow_calls, secrets) if router else []}
        if error is None:
            assert outcome is not None
            content = outcome.result if isinstance(outcome.result, str) else outcome.result_json
            done.update(output=outcome.result, content=content)
            fields["output"] = redact(outcome.result, secrets)
        else:
            error.message = redact(error.message, secrets)
            error.details = redact(error.details, secrets)
            done["error"] = error.to_dict()
            fields["error"] = done["error"]
        if outcome is not None:
            fields["logs"] = redact(outcome.logs, secrets)
            fields["logs_truncated"] = outcome.logs_truncated
            fields["chunk_count"] = outcome.chunks
        pipe = runtime.redis.pipeline(transaction=False)
        carries_secret = error is None and fields["output"] != done["output"]
        cache = job.get("cache")
        if cache:
            # An output carrying a request secret is not cached: the entry would hold the secret in clear.
            if error is None and cache.get("ttl") and not carries_secret:
                entry = {"output": done["output"], "content": done["content"], "usage": done["usage"],
                         "version": job["version"], "request_id": request_id, "created_at": time.time(),
                         "chunks": runs.chunks(request_id) if outcome and outcome.chunks else []}
                runtime.cache.put(pipe, job["account"], cache["key"], entry, int(cache["ttl"]), runs.hit_fields(
                    request_id, job["version"], fields["output"], done["usage"], len(entry["chunks"])))
            runtime.cache.release(job["account"], cache["key"], request_id, pipe=pipe)
        if carries_secret:
            # The stream keeps the run's final event as long as the record; the
            # clear output goes to the caller through a key it takes at once.
            runs.put_reply(pipe, request_id, {"output": done["output"], "content": done["content"]})
            done.update(output=fields["output"], content=redact(done["content"], secrets), reply=True)
        runs.finish(pipe, request_id, done, fields)
        for record in calls.records:
            pipe.hincrby(keys.METRICS, f"{record.get('kind', 'model')}_calls:{record['status']}", 1)
        pipe.execute()
        return status.value
    finally:
        runtime.active.discard(request_id)
        runtime.cancels.pop(request_id, None)
