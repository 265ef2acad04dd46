"""Sending a run whose publish failed: nothing ran (safe to retry), or it may run (the outcome is unknown).

The broker's failure is injected (a publish that raises after its message
may have reached the broker cannot be made for real on demand); Redis, the
run record and the claim are real.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

import pytest
import redis

from flowpool import keys
from flowpool.api.admission import Admission, submit
from flowpool.api.services import Services
from flowpool.errors import OutcomeUnavailable, Unavailable
from flowpool.redis_server import RedisServer
from flowpool.run import RunJob, RunRecord, RunStatus
from flowpool.settings import Settings


@pytest.fixture
def svc(redis_server: RedisServer, redis_db: redis.Redis) -> Iterator[Services]:
    services = Services(Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15"))
    redis_db.zadd(keys.WORKERS, {"worker-a": time.time() + 3600})  # a worker is alive
    redis_db.zadd(keys.queue_workers("default"), {"worker-a": time.time() + 3600})  # serving the default queue
    yield services
    services.redis.close()


def _queued(svc: Services) -> Admission:
    request_id = f"req_{uuid.uuid4().hex}"
    record = RunRecord(request_id=request_id, account="acct-1", workflow="w", status=RunStatus.QUEUED,
                       version="1.0.0", queued_at=time.time())
    assert svc.runs.begin(record, lock_seconds=70)[0] == "queued"
    job = RunJob(request_id=request_id, account="acct-1", workflow="w", version="1.0.0", content_hash="h",
                 soft_seconds=10)
    return Admission("queued", request_id, "sess", 15, job=job)


def _broker_fails(svc: Services, monkeypatch: pytest.MonkeyPatch, meanwhile: Any = None) -> None:
    def send_task(*args: Any, **kwargs: Any) -> None:
        if meanwhile is not None:
            meanwhile()
        raise ConnectionError("the broker's answer was lost")

    monkeypatch.setattr(svc.celery, "send_task", send_task)


def test_a_publish_that_failed_before_any_worker_took_the_run_is_safe_to_retry(
        svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    admission = _queued(svc)
    _broker_fails(svc, monkeypatch)
    with pytest.raises(Unavailable) as refused:
        submit(svc, admission)
    assert refused.value.retry_safe
    record = svc.runs.get(admission.request_id)
    assert record is not None and record.status == RunStatus.EXPIRED.value  # no worker will run it


def test_a_publish_that_failed_after_a_worker_took_the_run_is_not_safe_to_retry(
        svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    admission = _queued(svc)
    _broker_fails(svc, monkeypatch, meanwhile=lambda: svc.runs.claim(admission.request_id, "worker-a", 5000))
    with pytest.raises(OutcomeUnavailable) as unknown:
        submit(svc, admission)
    assert not unknown.value.retry_safe and unknown.value.details["request_id"] == admission.request_id
    record = svc.runs.get(admission.request_id)
    assert record is not None and record.status == RunStatus.RUNNING.value  # left to its worker
