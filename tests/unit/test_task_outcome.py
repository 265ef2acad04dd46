"""What a run's Celery task reports (Flower's view), and the end a worker returns when its write of it was not
applied: real Redis, real run records and FINISH script; no worker, no sandbox."""
from __future__ import annotations

import logging
import time

import pytest
from celery.exceptions import Ignore

from flowpool.errors import (RunError, RunNotStarted, ScriptError, TimeLimitExceeded, WorkerLost,
                             run_error_from_dict)
from flowpool.run import RunEnd, RunJob, RunRecord, RunStatus
from flowpool.sandbox import RunOutcome
from flowpool.tasks.execute import _record_end
from flowpool.tasks.model_calls import RunCalls
from flowpool.tasks.run_task import _task_outcome
from flowpool.tasks.worker import WorkerRuntime

ACCOUNT = "acct-1"
REQUEST_ID = "req_outcome"
CLAIM = "claim-of-this-delivery"


def _raised(end: RunEnd | None) -> BaseException:
    with pytest.raises(BaseException) as raised:
        _task_outcome(REQUEST_ID, end)
    return raised.value


def _failed(error: RunError) -> RunEnd:
    return RunEnd(status=RunStatus.for_error(error).value, version="1.0.0", error=error.to_dict())


# What the task reports


def test_a_failed_runs_task_raises_its_error_class_naming_the_request_and_the_scripts_exception_class_only() -> None:
    error = ScriptError("ValueError: no user alice@example.com with card 4111111111111111",
                        exception="ValueError", traceback='Traceback...\nValueError: no user alice@example.com')

    raised = _raised(_failed(error))

    assert type(raised) is ScriptError
    assert repr(raised) == f"ScriptError('{REQUEST_ID}: ValueError')"


@pytest.mark.parametrize(("error", "shown"), [
    (TimeLimitExceeded("the run passed its soft time limit (1s)", limit="soft", seconds=1.0),
     f"TimeLimitExceeded('{REQUEST_ID}: soft limit 1s')"),
    (TimeLimitExceeded("the run passed its hard time limit (2s) and was killed", limit="hard", seconds=1.0),
     f"TimeLimitExceeded('{REQUEST_ID}: hard limit (soft limit 1s + grace)')"),
    (WorkerLost("the worker running this request stopped answering; the run was lost"),
     f"WorkerLost('{REQUEST_ID}')"),
    (RunNotStarted("no worker started the run within 10s; it was dropped"), f"RunNotStarted('{REQUEST_ID}')"),
    # A class the script made up, named with its caller's data, is named by none.
    (ScriptError("boom", exception="sk live 123 (alice)", traceback=""), f"ScriptError('{REQUEST_ID}')"),
], ids=["soft-limit", "hard-limit", "lost", "not-started", "odd-class-name"])
def test_a_failed_runs_task_carries_no_message_of_the_run(error: RunError, shown: str) -> None:
    raised = _raised(_failed(error))

    assert repr(raised) == shown
    assert type(raised) is type(run_error_from_dict(error.to_dict()))


def test_a_delivery_that_found_its_run_another_deliverys_is_ignored() -> None:
    assert isinstance(_raised(None), Ignore)


# The end a worker returns when its write was not applied


@pytest.fixture
def job(runtime: WorkerRuntime) -> RunJob:
    """A run claimed by this delivery (under CLAIM), as the worker holds it while its script runs."""
    runtime.runs.begin(RunRecord(request_id=REQUEST_ID, account=ACCOUNT, workflow="w", status=RunStatus.QUEUED,
                                 version="1.0.0", queued_at=time.time()))
    assert runtime.runs.claim(REQUEST_ID, runtime.name, runtime.lease_ms, 30, CLAIM)
    return RunJob(request_id=REQUEST_ID, account=ACCOUNT, workflow="w", version="1.0.0", content_hash="h",
                  soft_seconds=5)


def _record(runtime: WorkerRuntime, job: RunJob, error: RunError | None = None) -> RunEnd:
    outcome = RunOutcome(result={"ok": True}, result_json='{"ok": true}') if error is None else RunOutcome(error=error)
    return _record_end(runtime, job, CLAIM, outcome, error, RunCalls(job), [], [], [], None, time.monotonic() + 5)


@pytest.mark.parametrize("error", [None, ScriptError("boom", exception="ValueError", traceback="Traceback...")],
                         ids=["succeeded", "failed"])
def test_an_end_written_again_after_redis_applied_it_returns_that_end(
        runtime: WorkerRuntime, job: RunJob, error: RunError | None, caplog: pytest.LogCaptureFixture) -> None:
    first = _record(runtime, job, error)

    # The same delivery writes its end again, as it does when Redis ran the first write but its answer was lost.
    with caplog.at_level(logging.WARNING, logger="flowpool.worker"):
        again = _record(runtime, job, error)

    assert again == first
    assert again.status == ("succeeded" if error is None else "failed")
    assert runtime.runs.end_of(REQUEST_ID) == RunEnd.from_message(first.to_message())
    assert "was not recorded" not in caplog.text


def test_an_end_not_written_because_the_run_was_taken_for_lost_returns_the_recorded_end(
        runtime: WorkerRuntime, job: RunJob, caplog: pytest.LogCaptureFixture) -> None:
    lost = WorkerLost("the worker running this request stopped answering; the run was lost")
    assert runtime.runs.abandon(REQUEST_ID, RunStatus.RUNNING, lost, "1.0.0", force=True)

    with caplog.at_level(logging.WARNING, logger="flowpool.worker"):
        returned = _record(runtime, job)

    assert returned == runtime.runs.end_of(REQUEST_ID)
    assert (returned.status, returned.error) == ("lost", lost.to_dict())
    assert f"run {REQUEST_ID}: its end (succeeded) was not recorded" in caplog.text
