"""What only workers load: the ``flowpool.run`` task around :func:`execute_run`, and the bootstep
that starts and stops the worker's runtime (sandbox, heartbeat) with the Celery worker.

What Celery reports of a run's task (its events, so Flower's states, counts
and filters) is how the run ended for its caller: a run that succeeded is a
task that returned ``"succeeded"``; one that failed, timed out, was cancelled
or lost, or could not be opened, is a task that failed (``FAILURE``) with the
run's error class, raised once the end is recorded. That exception names the
request and the error's type only (a script's exception class, a time
limit), never the message: the worker logs it and task events carry it, and
a script's message may echo its caller's data. Callers never read any of it:
they read the run's end from Redis (:mod:`flowpool.runs`), which this does
not change. A delivery that did not run its run because its caller ended it
before any delivery started it reports that end. One that found the run
another delivery's (the same message delivered twice: it is running, or ended
under that delivery's claim) raises Celery's ``Ignore``, which sends no
event, so the task id the two share keeps the state the other reports.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import traceback
from typing import Any

from celery import Celery, bootsteps
from celery.exceptions import Ignore
from celery.signals import worker_shutting_down
from celery.worker import state

from flowpool.errors import (RunError, RunNotStarted, SandboxError, ScriptError, TimeLimitExceeded, WorkerLost,
                             run_error_from_dict)
from flowpool.pool import live_queue_workers
from flowpool.queues import broker_queue, queue_of_broker
from flowpool.run import RunEnd, RunJob, RunStatus
from flowpool.sealing import InvalidToken
from flowpool.settings import Settings

from .app import RUN_TASK, create_celery
from .execute import execute_run, redact, secret_redactions, skipped_delivery
from .worker import WorkerRuntime

__all__ = ["worker_celery"]

log = logging.getLogger("flowpool.worker")

# A script's exception class name as its failed task names it: a class the script made up with any other name
# (``type("...", (Exception,), {})``) is named by none.
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,99}")


def worker_celery(settings: Settings) -> Celery:
    """The Celery app of a worker: the sending app, plus the run task and the runtime bootstep."""
    app = create_celery(settings)
    app.flowpool_settings = settings
    app.flowpool_runtime = None
    app.flowpool_ready = threading.Event()

    # Not shared: a shared task would be added to every Celery app made after this one in the process.
    # `throws`: a run that did not succeed is an expected failure, which Celery logs at INFO without a
    # traceback. No result is stored (there is no result backend) and nothing retries or redelivers it: the
    # message was acknowledged as the run started.
    @app.task(name=RUN_TASK, bind=True, ignore_result=True, shared=False, throws=(RunError,))
    def run_workflow(self: Any, job: dict[str, Any]) -> str:
        if not self.app.flowpool_ready.wait(60):
            raise RuntimeError("the flowpool worker runtime did not start")
        runtime = self.app.flowpool_runtime
        if runtime.is_draining() and _hand_back(self, runtime, job):
            raise Ignore()  # another worker runs it; this one sends no event for it
        end: RunEnd | None
        try:
            run_job = RunJob.from_message(job, runtime.sealer)
        except InvalidToken:
            end = _unopenable(runtime, job)
        else:
            try:
                end = execute_run(runtime, run_job)
            except Exception as exc:  # never Celery's own log line, which would show the exception's args
                end = _failed_in_worker(runtime, run_job, exc)
        # Out of every except block: the failure raised carries no exception of the worker's as its context.
        return _task_outcome(str(job.get("request_id")), end)

    def shutting_down(**_: Any) -> None:
        # The warm shutdown's signal handler, in the main thread: what a fetch under way still delivers from
        # now on is handed back (_hand_back). It takes no lock (ask_drain): it may have interrupted one.
        runtime = app.flowpool_runtime
        if runtime is not None:
            runtime.ask_drain()

    worker_shutting_down.connect(shutting_down, weak=False)
    app.steps["worker"].add(_RuntimeStep)
    return app


def _hand_back(task: Any, runtime: WorkerRuntime, job: dict[str, Any]) -> bool:
    """Put back in its queue a run a draining worker took: whether it went back (else this worker runs it).

    A fetch already under way when the warm shutdown began still delivers
    its message; the message was acknowledged as the task started, so the
    job is sent again, with its task id and expiry, for a worker that stays.
    It goes back once only, and only while another worker serves its queue:
    otherwise (the last worker of a queue, or draining workers passing it
    around) it runs here, within the drain. Should two deliveries ever meet,
    the run's claim lets one of them run it.
    """
    request = task.request
    queue = queue_of_broker(str((request.delivery_info or {}).get("routing_key") or ""))
    request_id = str(job.get("request_id"))
    if queue is None or job.get("handed_back") or not _others_serve(runtime, queue):
        return False
    try:
        task.app.send_task(RUN_TASK, kwargs={"job": {**job, "handed_back": True}}, task_id=request.id,
                           queue=broker_queue(queue),
                           expires=request.expires, argsrepr="()",  # as the API sent it: no input, no secrets
                           kwargsrepr=f"{{'job': <run {request_id} of {job.get('workflow')}@{job.get('version')}>}}")
    except Exception as exc:  # the broker did not take it back: run it here, within the drain
        log.warning("run %s: taken while draining and could not be put back (%s); running it here",
                    request_id, type(exc).__name__)
        return False
    log.info("run %s: taken while draining; put back in its queue for another worker", request_id)
    return True


def _others_serve(runtime: WorkerRuntime, queue: str) -> bool:
    """Whether a live worker other than this one (which stopped naming itself) consumes ``queue``."""
    try:
        names = live_queue_workers(runtime.redis, queue, runtime.settings.worker_ttl_seconds)
    except Exception:  # Redis did not answer: run it here
        return False
    return any(name != runtime.name for name in names)


def _task_outcome(request_id: str, end: RunEnd | None) -> str:
    """What the run's task returns once the run's end is recorded, or, for a run that did not succeed, raises.

    The failure raised is the run's error class (``ScriptError``, ``TimeLimitExceeded``, ``WorkerLost``...)
    with the request id and the error's type (:func:`_failure_summary`): what Flower shows as the exception.
    A delivery that found its run another delivery's (``end`` None) raises ``Ignore``: no event, no count.
    """
    if end is None:
        raise Ignore()
    if end.error is None:
        return end.status
    summary = _failure_summary(end.error)
    raise run_error_from_dict({"kind": end.error.get("kind"),
                               "message": f"{request_id}: {summary}" if summary else request_id}) from None


def _failure_summary(error: dict[str, Any]) -> str:
    """The type of a run's error, beyond its class, in words that hold none of the run's data: a script's
    exception class, or which time limit it passed. The message, which may echo the caller's input, stays in
    the run's record."""
    if error.get("kind") == ScriptError.__name__:
        exception = error.get("exception")
        return exception if isinstance(exception, str) and _CLASS_NAME.fullmatch(exception) else ""
    if error.get("kind") == TimeLimitExceeded.__name__:
        limit, seconds = error.get("limit"), error.get("seconds")
        if limit in ("soft", "hard") and isinstance(seconds, (int, float)):
            return f"soft limit {seconds:g}s" if limit == "soft" else f"hard limit (soft limit {seconds:g}s + grace)"
    return ""


def _unopenable(runtime: WorkerRuntime, job: dict[str, Any]) -> RunEnd | None:
    """End a run whose secrets this worker cannot open: its key differs from the API's. A run not queued any
    more is left as it is, and reported as a skipped delivery reports it (:func:`skipped_delivery`)."""
    message = ("the worker could not open the request's secrets: FLOWPOOL_SECRET_KEY differs between "
               "the API and the workers (or the message was altered)")
    request_id = str(job.get("request_id"))
    log.error("run %s: %s", request_id, message)
    error = RunNotStarted(message)
    if not runtime.runs.abandon(request_id, RunStatus.QUEUED, error, job.get("version")):
        # It moved on: another delivery holds it (its single-flight lock too), or its caller ended it.
        return skipped_delivery(runtime, request_id)
    cache = job.get("cache")
    if cache:
        runtime.cache.release(str(job.get("account")), cache["key"], request_id)
    return RunEnd(status=RunStatus.EXPIRED.value, version=job.get("version"), error=error.to_dict())


def _failed_in_worker(runtime: WorkerRuntime, job: RunJob, exc: Exception) -> RunEnd:
    """End a run the worker itself failed on (not its script): logged redacted, answered at once."""
    trace = redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                   secret_redactions(job.secret_values()))
    log.error("run %s: the worker failed: %s", job.request_id, trace.encode("utf-8", "backslashreplace").decode())
    error: RunError = SandboxError(
        f"the worker could not run this run ({type(exc).__name__}); see the worker's log")
    if runtime.gave_up.is_set():  # it failed as its worker's shutdown killed it
        error = WorkerLost("the worker shut down before the run finished; the run was lost")
    try:
        runtime.runs.claim(job.request_id, runtime.name, runtime.lease_ms)  # a run not yet claimed fails all the same
        runtime.runs.abandon(job.request_id, RunStatus.RUNNING, error, job.version, force=True)
        if job.cache is not None:
            runtime.cache.release(job.account, job.cache.key, job.request_id)
    except Exception as unrecorded:  # e.g. Redis gone: its lease lapses and the caller hears worker_lost
        log.error("run %s: could not record that the worker failed: %s", job.request_id, type(unrecorded).__name__)
    return RunEnd(status=RunStatus.for_error(error).value, version=job.version, error=error.to_dict())


class _RuntimeStep(bootsteps.StartStopStep):
    """Starts the sandbox and the heartbeat with the worker, and stops them with it once its runs drained."""

    requires = {"celery.worker.components:Pool"}

    # Seconds the runs killed when the drain time ran out get to record their end before the sandbox goes.
    _RECORD_SECONDS = 5.0

    def start(self, worker: Any) -> None:
        app = worker.app
        queues = [q for q in (queue_of_broker(q.name) for q in app.amqp.queues.consume_from.values()) if q] or None
        runtime = WorkerRuntime(app.flowpool_settings, name=worker.hostname, queues=queues,
                                slots=worker.concurrency)
        runtime.start()
        app.flowpool_runtime = runtime
        app.flowpool_ready.set()

    def stop(self, worker: Any) -> None:
        runtime = worker.app.flowpool_runtime
        if runtime is None:
            return
        # This step stops after the consumer and before the pool: on a warm
        # shutdown (SIGTERM) the worker takes no more runs, and holds none it
        # has not started (prefetch is off with Redis, see tasks.app; amqp
        # takes back what it had reserved), so whatever waits is still in
        # the queue for other workers. The runs still going get
        # FLOWPOOL_WORKER_DRAIN_SECONDS to finish; those that do not are
        # killed and end as worker_lost before the sandbox goes away.
        runtime.stop_serving()
        drain = worker.app.flowpool_settings.worker_drain
        if not _runs_ended_within(drain):
            log.warning("%d runs still going after the drain time (%gs): killing them; they end as worker_lost",
                        len(runtime.active), drain)
            runtime.gave_up.set()
            for stop in list(runtime.stops.values()):
                stop.ask(WorkerLost("the worker shut down before the run finished (FLOWPOOL_WORKER_DRAIN_SECONDS "
                                    "ran out); the run was lost"))
            _runs_ended_within(self._RECORD_SECONDS)
        worker.app.flowpool_ready.clear()
        runtime.stop()
        worker.app.flowpool_runtime = None


def _runs_ended_within(seconds: float) -> bool:
    """Wait up to ``seconds`` for the worker's runs to end; whether they did (a cold shutdown ends the wait)."""
    deadline = time.monotonic() + seconds
    while state.active_requests:
        if time.monotonic() >= deadline or state.should_terminate:
            return False
        time.sleep(0.05)
    return True
