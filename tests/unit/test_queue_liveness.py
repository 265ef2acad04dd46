"""Which workers serve a queue, as the API and the heartbeat see it: older workers, draining ones, refusals.

Real Redis throughout; the workers are their heartbeats, written as a
worker writes them (``WorkerRuntime._send_beat``) or, for a worker of a
release before worker queues, as it wrote them (its time in WORKERS only).
"""
from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import redis
from celery.worker import state

from flowpool import keys
from flowpool.api.admission import admit
from flowpool.api.app import create_app
from flowpool.api.models import InvokeRequest
from flowpool.api.services import Services
from flowpool.errors import Unavailable
from flowpool.queues import broker_queue
from flowpool.redis_server import RedisServer
from flowpool.registry import Account, Upload
from flowpool.settings import Settings
from flowpool.tasks.app import create_celery
from flowpool.tasks.run_task import _hand_back
from flowpool.tasks.worker import WorkerRuntime


@dataclass(eq=False)
class _Taken:
    """What Celery's worker state holds of a message it took: its id and delivery info."""

    id: str
    delivery_info: dict[str, Any] = field(default_factory=lambda: {"routing_key": broker_queue("heavy")})


@pytest.fixture
def settings(redis_server: RedisServer, redis_db: redis.Redis) -> Settings:
    return Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", worker_heartbeat_seconds=0.1,
                    sandbox_prestart=0)


@pytest.fixture
def svc(settings: Settings) -> Iterator[Services]:
    services = Services(settings)
    yield services
    services.redis.close()


@pytest.fixture
def runtime(settings: Settings) -> Iterator[WorkerRuntime]:
    worker = WorkerRuntime(settings, name="worker-heavy", queues=["heavy"], slots=2)
    yield worker
    if worker._drainer.is_alive():
        os.write(worker._drain_pipe[1], b"q")
        worker._drainer.join(5)
    worker.redis.close()


def test_a_worker_from_before_worker_queues_still_serves_the_default_queue(svc: Services,
                                                                          redis_db: redis.Redis) -> None:
    redis_db.zadd(keys.WORKERS, {"worker-old": time.time()})  # all an older worker's heartbeat writes

    assert svc.live_workers("default") == 1
    assert svc.live_workers("heavy") == 0


def test_a_worker_of_other_queues_alone_does_not_serve_the_default_queue(svc: Services,
                                                                         runtime: WorkerRuntime) -> None:
    runtime._send_beat()

    assert svc.live_workers("heavy") == 1
    assert svc.live_workers("default") == 0
    assert svc.live_workers() == 1


def test_a_draining_worker_serves_no_queue_but_still_reports_its_runs(svc: Services, runtime: WorkerRuntime,
                                                                      redis_db: redis.Redis) -> None:
    runtime.active["req_going"] = "heavy"
    runtime._send_beat()
    runtime.stop_serving()
    assert svc.live_workers("heavy") == 0
    runtime._send_beat()  # later beats of the drain do not bring it back

    assert svc.live_workers("heavy") == 0
    pool = svc.pool.read()
    assert (pool.queues["heavy"].workers, pool.queues["heavy"].running) == (0, 1)
    assert [(w.name, w.draining) for w in pool.workers] == [("worker-heavy", True)]


def test_a_run_taken_from_the_broker_and_not_claimed_yet_counts_as_reserved(runtime: WorkerRuntime) -> None:
    taken, going = _Taken("req_taken"), _Taken("req_going")
    state.reserved_requests.update({taken, going})
    state.active_requests.update({taken, going})  # both accepted by a pool thread; one claimed its run
    runtime.active["req_going"] = "heavy"
    try:
        report = runtime.pool_report(time.time())
    finally:
        state.reserved_requests.difference_update({taken, going})
        state.active_requests.difference_update({taken, going})

    assert report["reserved"] == {"heavy": 1}
    assert report["running"] == {"heavy": 1}


def test_a_run_for_a_queue_no_worker_serves_is_refused_before_anything_is_written(svc: Services,
                                                                                  redis_db: redis.Redis) -> None:
    svc.workflows.upload("acct-1", Upload(ref="w", script="QUEUE = 'heavy'\ndef execute(ctx):\n    return 1\n"))
    before = set(redis_db.keys())
    body = InvokeRequest(model="workflow:w", input={"n": 1})

    with pytest.raises(Unavailable, match="flowpool worker --queues heavy"):
        admit(svc, Account(id="acct-1", name="a"), body, idempotency_key="retry-me")

    # No run record, lock or Idempotency-Key (the reaper's pass lock may be taken: it is no request's).
    assert set(redis_db.keys()) - before - {keys.RUNS_REAPER.encode()} == set()


@pytest.mark.parametrize(("autoscaled", "status"), [("", 503), ("default", 200)])
def test_with_no_worker_the_api_is_ready_only_when_an_autoscaler_starts_workers(settings: Settings,
                                                                               autoscaled: str, status: int) -> None:
    app = create_app(settings.model_copy(update={"autoscaled_queues": autoscaled}))
    try:
        response = app.test_client().get("/readyz")
    finally:
        app.extensions["flowpool"].redis.close()

    assert response.status_code == status, response.text
    assert response.json["checks"]["workers"] == 0


def test_a_drain_asked_from_a_signal_handler_is_carried_out_by_the_drainer(svc: Services,
                                                                          runtime: WorkerRuntime) -> None:
    runtime._send_beat()
    runtime._drainer.start()
    runtime.ask_drain()  # what the handler does: a flag and a byte, no lock
    assert runtime.is_draining()
    runtime._drainer.join(5)

    assert not runtime._drainer.is_alive() and runtime.draining.is_set()
    assert svc.live_workers("heavy") == 0


def _taken(runtime: WorkerRuntime, **job: Any) -> tuple[Any, dict[str, Any]]:
    """The task context of a run a draining worker took from the heavy queue, as _hand_back reads it."""
    app = create_celery(runtime.settings)
    request = SimpleNamespace(id="req_taken", delivery_info={"routing_key": broker_queue("heavy")}, expires=None)
    return SimpleNamespace(app=app, request=request), {"request_id": "req_taken", "workflow": "w", "version": "1",
                                                      **job}


@pytest.mark.parametrize("others", [False, True])
def test_a_run_taken_while_draining_goes_back_only_while_another_worker_serves_its_queue(
        runtime: WorkerRuntime, redis_db: redis.Redis, others: bool) -> None:
    runtime.stop_serving()
    if others:
        redis_db.zadd(keys.queue_workers("heavy"), {"worker-staying": time.time()})
    task, job = _taken(runtime)

    assert _hand_back(task, runtime, job) is others
    sent = redis_db.lrange(broker_queue("heavy"), 0, -1)
    assert len(sent) == (1 if others else 0)
    if others:  # once only: a run handed back before runs where it lands
        assert b"handed_back" in base64.b64decode(json.loads(sent[0])["body"])
        again_task, again = _taken(runtime, handed_back=True)
        assert _hand_back(again_task, runtime, again) is False
