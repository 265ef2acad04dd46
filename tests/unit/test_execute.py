"""A worker's run that fails before its sandbox opened the claim gate: its end is still recorded.

The sandbox's failure to start the run (its cgroup could not be set, its
prestarted process died) is injected: it cannot be made on demand for real.
Redis, the run record, the claim and the end are real.
"""
from __future__ import annotations

import time
from typing import Any

import pytest

from flowpool.errors import SandboxError
from flowpool.registry import Upload, Workflows
from flowpool.run import RunJob, RunRecord, RunStatus
from flowpool.sandbox import RunOutcome
from flowpool.tasks.execute import execute_run
from flowpool.tasks.worker import WorkerRuntime

ACCOUNT = "acct-1"


def test_a_run_the_sandbox_could_not_start_is_claimed_and_ends_failed(runtime: WorkerRuntime,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    Workflows(runtime.redis).upload(ACCOUNT, Upload(ref="w", script="def execute(ctx):\n    return 1\n"))
    workflow = Workflows(runtime.redis).resolve(ACCOUNT, "w")
    runtime.runs.begin(RunRecord(request_id="req_1", account=ACCOUNT, workflow="w", status=RunStatus.QUEUED,
                                 version=workflow.version, queued_at=time.time()), lock_seconds=70, rev=workflow.rev)

    def cannot_start(*args: Any, **kwargs: Any) -> RunOutcome:  # returns before calling its gate
        return RunOutcome(error=SandboxError("could not set the run's cgroup limits"))

    monkeypatch.setattr(runtime.sandbox, "run", cannot_start)
    job = RunJob(request_id="req_1", account=ACCOUNT, workflow="w", version=workflow.version,
                 content_hash=workflow.content_hash, soft_seconds=5)

    ended = execute_run(runtime, job)
    assert ended is not None and ended.status == RunStatus.FAILED.value
    record = runtime.runs.get("req_1")
    assert record is not None and record.status == RunStatus.FAILED.value and record.worker == "worker-a"
    assert record.error is not None and "cgroup" in record.error["message"]
    end = runtime.runs.end_of("req_1")
    assert end is not None and end.status == RunStatus.FAILED.value
