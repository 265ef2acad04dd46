"""The demand signal: the arithmetic of each queue's desired workers, the reads behind it, and who may read it."""
from __future__ import annotations

import json
import time
from typing import Iterator

import pytest
import redis
from flask.testing import FlaskClient

from flowpool import keys
from flowpool.api.app import create_app
from flowpool.api.operators import is_loopback
from flowpool.procs import free_port
from flowpool.pool import PoolReader, WorkerReport, declared_lengths, desired_workers, queue_demand
from flowpool.queues import broker_queue
from flowpool.redis_server import RedisServer
from flowpool.settings import Settings
from flowpool.tasks.worker import WorkerRuntime

ADMIN_TOKEN = "admin-token-of-the-operators-0123"


def _worker(name: str, queues: list[str], slots: int, running: dict[str, int] | None = None,
            reserved: dict[str, int] | None = None) -> WorkerReport:
    return WorkerReport(name=name, queues=queues, slots=slots, running=running or {}, reserved=reserved or {})


@pytest.mark.parametrize(("queued", "reserved", "running", "slots", "desired"), [
    (0, 0, 0, 4, 0),    # nothing to do: scale to zero
    (1, 0, 0, 4, 1),    # one waiting run asks for a worker
    (0, 0, 4, 4, 1),    # a busy worker with nothing queued is still wanted
    (0, 0, 5, 4, 2),
    (3, 1, 4, 4, 2),    # queued, fetched and going all count
    (9, 0, 0, 4, 3),
])
def test_desired_workers_hold_every_queued_reserved_and_running_run(queued: int, reserved: int, running: int,
                                                                    slots: int, desired: int) -> None:
    assert desired_workers(queued, reserved, running, slots) == desired


def test_a_queue_no_worker_serves_asks_for_one_as_soon_as_a_run_waits() -> None:
    demand = queue_demand(["default", "heavy"], {"heavy": 3}, [_worker("w1", ["default"], 8)], default_slots=16)

    assert demand["heavy"].workers == 0
    assert demand["heavy"].slots_per_worker == 16  # what a worker started from zero will have
    assert demand["heavy"].desired_workers == 1
    assert (demand["default"].queued, demand["default"].workers, demand["default"].desired_workers) == (0, 1, 0)


def test_a_queue_adds_up_its_workers_runs_and_takes_the_largest_slot_count() -> None:
    workers = [_worker("w1", ["default", "heavy"], 4, running={"default": 3, "heavy": 1}, reserved={"heavy": 1}),
               _worker("w2", ["heavy"], 2, running={"heavy": 2})]

    demand = queue_demand(["default"], {"default": 2, "heavy": 5}, workers, default_slots=16)

    assert list(demand) == ["default", "heavy"]  # default first, then every queue a worker serves
    assert demand["heavy"].__dict__ == {"queued": 5, "reserved": 1, "running": 3, "slots_per_worker": 4,
                                        "workers": 2, "desired_workers": 3}
    assert demand["default"].__dict__ == {"queued": 2, "reserved": 0, "running": 3, "slots_per_worker": 4,
                                          "workers": 1, "desired_workers": 2}


@pytest.fixture
def settings(redis_server: RedisServer, redis_db: redis.Redis) -> Settings:
    """Settings on database 15 of the session's Redis (flushed per test), a queue autoscaled from zero."""
    return Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", worker_ttl_seconds=2,
                    worker_concurrency=16, autoscaled_queues="gpu", sandbox_prestart=0)


def test_the_reader_counts_live_workers_reports_and_the_broker_lists(settings: Settings,
                                                                     redis_db: redis.Redis) -> None:
    runtime = WorkerRuntime(settings, name="worker-a", queues=["default", "heavy"], slots=4)
    runtime.active.update({"r1": "default", "r2": "heavy", "r3": "heavy"})
    runtime._send_beat()  # the heartbeat as a worker sends it
    # A worker killed outright: its last report stays behind, its heartbeat older than the TTL.
    redis_db.zadd(keys.WORKERS, {"worker-dead": time.time() - 10})
    redis_db.hset(keys.WORKER_POOL, "worker-dead", json.dumps(
        {"queues": ["default"], "slots": 50, "running": {"default": 7}, "reserved": {}, "at": time.time() - 10}))
    redis_db.lpush(broker_queue("default"), "m1", "m2")
    redis_db.lpush(broker_queue("heavy"), *[f"m{i}" for i in range(9)])
    try:
        state = PoolReader(settings, redis_db).read()
    finally:
        runtime.redis.close()

    assert list(state.queues) == ["default", "gpu", "heavy"]
    assert [worker.name for worker in state.workers] == ["worker-a"]
    assert state.workers[0].running == {"default": 1, "heavy": 2}
    assert state.workers[0].last_beat_age < settings.worker_ttl_seconds
    heavy, default = state.queues["heavy"], state.queues["default"]
    assert (heavy.queued, heavy.running, heavy.slots_per_worker, heavy.workers, heavy.desired_workers) == (9, 2, 4, 1, 3)
    assert (default.queued, default.running, default.slots_per_worker, default.workers,
            default.desired_workers) == (2, 1, 4, 1, 1)
    assert state.queues["gpu"].desired_workers == 0
    assert state.to_dict()["queues"]["heavy"]["desired_workers"] == 3


def test_a_broker_of_its_own_is_read_where_it_is(settings: Settings, redis_server: RedisServer,
                                                  redis_db: redis.Redis) -> None:
    broker = redis.Redis(port=redis_server.port, db=14)
    broker.flushdb()
    broker.lpush(broker_queue("default"), "m1", "m2", "m3")
    redis_db.lpush(broker_queue("default"), "not-the-brokers")
    try:
        own = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{redis_server.port}/14"})
        assert PoolReader(own, redis_db).read().queues["default"].queued == 3
    finally:
        broker.flushdb()
        broker.close()


def test_a_passive_declare_counts_messages_and_zero_for_a_queue_never_declared(settings: Settings,
                                                                              redis_db: redis.Redis) -> None:
    # kombu's declare through the Redis transport: the path an amqp broker takes, on a broker the tests can start.
    redis_db.lpush(broker_queue("heavy"), "m1", "m2")

    assert declared_lengths(settings.redis, ["default", "heavy"]) == {"default": 0, "heavy": 2}


@pytest.mark.parametrize(("address", "local"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("2001:db8::1", False), ("", False), (None, False),
    ("not-an-address", False),
])
def test_loopback_is_told_from_every_other_address(address: str | None, local: bool) -> None:
    assert is_loopback(address) is local


def _client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["flowpool"].redis.close()


@pytest.fixture
def without_token(settings: Settings) -> Iterator[FlaskClient]:
    yield from _client(settings)


@pytest.fixture
def with_token(settings: Settings) -> Iterator[FlaskClient]:
    yield from _client(settings.model_copy(update={"admin_token": ADMIN_TOKEN}))


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_without_an_admin_token_loopback_may_read_the_pool(without_token: FlaskClient, address: str) -> None:
    response = without_token.get("/api/v1/pool", environ_base={"REMOTE_ADDR": address})

    assert response.status_code == 200, response.text
    assert response.json["queues"]["default"]["desired_workers"] == 0


@pytest.mark.parametrize("address", ["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1"])
def test_without_an_admin_token_any_other_address_is_refused_403(without_token: FlaskClient, address: str) -> None:
    response = without_token.get("/api/v1/pool", environ_base={"REMOTE_ADDR": address})

    assert response.status_code == 403
    assert response.json["error"]["type"] == "permission_denied"
    assert "FLOWPOOL_ADMIN_TOKEN" in response.json["error"]["message"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-of-the-same-len", f"Basic {ADMIN_TOKEN}",
                                           f"Bearer {ADMIN_TOKEN}x"])
def test_with_an_admin_token_a_request_without_it_is_refused_401_even_from_loopback(
        with_token: FlaskClient, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}

    response = with_token.get("/api/v1/pool", headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"})

    assert response.status_code == 401
    assert response.json["error"]["type"] == "authentication_error"


def test_with_an_admin_token_its_bearer_may_read_the_pool_from_anywhere(with_token: FlaskClient) -> None:
    response = with_token.get("/api/v1/pool", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                              environ_base={"REMOTE_ADDR": "10.0.0.1"})

    assert response.status_code == 200, response.text
    assert set(response.json) == {"queues", "workers", "at"}


def test_the_openapi_document_says_the_pool_takes_the_admin_token(without_token: FlaskClient) -> None:
    spec = without_token.get("/openapi.json").json

    assert spec["paths"]["/api/v1/pool"]["get"]["security"] == [{"adminToken": []}]
    assert spec["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"


def test_a_broker_that_does_not_answer_costs_the_queue_gauges_not_the_scrape(settings: Settings,
                                                                            redis_db: redis.Redis) -> None:
    redis_db.hset(keys.METRICS, "runs:succeeded", 3)
    # A broker Redis of its own on a loopback port nothing listens on.
    gone = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    for client in _client(gone):
        response = client.get("/metrics")

        assert response.status_code == 200, response.text
        assert "flowpool_broker_up 0.0" in response.text
        assert 'flowpool_runs_finished_total{status="succeeded"} 3.0' in response.text
        assert "flowpool_queue_queued" not in response.text


def test_an_answering_broker_is_said_to_be_up(without_token: FlaskClient) -> None:
    response = without_token.get("/metrics")

    assert "flowpool_broker_up 1.0" in response.text
    assert 'flowpool_queue_queued{queue="default"}' in response.text
