"""POST /api/v1/runs when the broker does not take the run: the caller hears nothing ran, and no webhook is owed.

The broker's failure is injected (as in test_submit.py); Redis, the app, the
run record and the webhook's record are real.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import pytest
import redis
from flask.testing import FlaskClient

from flowpool import keys
from flowpool.api.app import create_app
from flowpool.redis_server import RedisServer
from flowpool.registry import Accounts, Upload
from flowpool.settings import Settings


@pytest.fixture
def app_client(redis_server: RedisServer, redis_db: redis.Redis,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FlaskClient, str]]:
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", egress_allow="127.0.0.1/32"))
    svc = app.extensions["flowpool"]
    account, key, _ = Accounts(redis_db).create("async")
    svc.workflows.upload(account.id, Upload(ref="w", script="def execute(ctx):\n    return 1\n"))
    redis_db.zadd(keys.WORKERS, {"worker-a": time.time() + 3600})  # a worker is alive
    redis_db.zadd(keys.queue_workers("default"), {"worker-a": time.time() + 3600})  # serving the default queue

    def send_task(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the broker is away")

    monkeypatch.setattr(svc.celery, "send_task", send_task)
    try:
        yield app.test_client(), key
    finally:
        svc.redis.close()


def test_a_run_the_broker_did_not_take_is_a_503_safe_to_retry_and_leaves_no_webhook_to_send(
        app_client: tuple[FlaskClient, str], redis_db: redis.Redis) -> None:
    client, key = app_client

    response = client.post("/api/v1/runs", headers={"x-api-key": key},
                           json={"model": "workflow:w", "input": {}, "webhook_url": "http://127.0.0.1:9/hook"})

    assert response.status_code == 503, response.text
    assert response.headers["x-should-retry"] == "true"
    assert redis_db.keys(keys.run_webhook("*")) == []  # its run ended as never started: nothing to tell


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/hook", "http://127.0.0.1:abc/hook", "http://127.0.0.1:0/h",
                                 "http://[::1/hook"])
def test_a_webhook_url_whose_port_is_no_port_is_a_400_naming_it_not_a_500(
        app_client: tuple[FlaskClient, str], redis_db: redis.Redis, url: str) -> None:
    client, key = app_client

    response = client.post("/api/v1/runs", headers={"x-api-key": key},
                           json={"model": "workflow:w", "input": {}, "webhook_url": url})

    assert response.status_code == 400, response.text
    assert response.get_json()["error"]["param"] == "webhook_url"
    assert redis_db.keys(keys.run_webhook("*")) == []


def test_the_openapi_document_gives_the_202_of_a_started_run(app_client: tuple[FlaskClient, str]) -> None:
    client, _ = app_client
    operation = client.get("/openapi.json").get_json()["paths"]["/api/v1/runs"]["post"]
    assert set(operation["responses"]) == {"202", "200", "default"}
    assert "top level" in operation["responses"]["202"]["description"]
