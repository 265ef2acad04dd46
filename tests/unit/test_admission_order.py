"""Admission refuses an oversized request before it makes the record's copy of its input (a walk and a JSON dump).

The app, Redis and the run's admission are real; the copy is replaced by one that fails, to see whether it ran.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import pytest
import redis
from flask.testing import FlaskClient

from flowpool import keys
from flowpool.api import admission
from flowpool.api.app import create_app
from flowpool.redis_server import RedisServer
from flowpool.registry import Accounts, Upload
from flowpool.settings import Settings

LIMIT = 4096


@pytest.fixture
def app_client(redis_server: RedisServer, redis_db: redis.Redis) -> Iterator[tuple[FlaskClient, str]]:
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", max_input_bytes=LIMIT))
    svc = app.extensions["flowpool"]
    account, key, _ = Accounts(redis_db).create("sizes")
    svc.workflows.upload(account.id, Upload(ref="w", script="def execute(ctx):\n    return 1\n"))
    redis_db.zadd(keys.WORKERS, {"worker-a": time.time() + 3600})  # a worker is alive
    redis_db.zadd(keys.queue_workers("default"), {"worker-a": time.time() + 3600})  # serving the default queue
    try:
        yield app.test_client(), key
    finally:
        svc.redis.close()


def test_an_input_over_the_size_limit_is_a_413_before_its_record_copy_is_made(
        app_client: tuple[FlaskClient, str], redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    client, key = app_client

    def copied(*args: Any) -> Any:
        raise AssertionError("the record's copy of an oversized input was made")

    monkeypatch.setattr(admission, "_as_recorded", copied)
    response = client.post("/api/v1/runs", headers={"x-api-key": key},
                           json={"model": "workflow:w", "input": {"text": "x" * (2 * LIMIT)}})

    assert response.status_code == 413, response.text
    assert redis_db.keys(keys.run("*")) == []
