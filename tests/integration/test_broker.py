"""RabbitMQ as the broker, with Redis kept for the registry, runs and cache."""
from __future__ import annotations

import socket
import uuid
from typing import Iterator

import pytest

from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer
from tests.helpers import Client

RABBIT = ("127.0.0.1", 5672)


def _rabbit_reachable() -> bool:
    try:
        with socket.create_connection(RABBIT, timeout=0.5):
            return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _rabbit_reachable(), reason="no RabbitMQ on 127.0.0.1:5672"),
]


@pytest.fixture
def rabbit_stack(redis_server: RedisServer) -> Iterator[Stack]:
    stack = Stack(env={"FLOWPOOL_BROKER_URL": f"amqp://guest:guest@{RABBIT[0]}:{RABBIT[1]}//",
                       "FLOWPOOL_LOG_LEVEL": "WARNING", "FLOWPOOL_WORKER_CONCURRENCY": "4"},
                  redis_url=redis_server.url).start()
    try:
        yield stack
    finally:
        stack.stop()


def test_workflows_run_with_rabbitmq_as_the_broker(rabbit_stack: Stack) -> None:
    assert rabbit_stack.api_url is not None
    client = Client(rabbit_stack.api_url, rabbit_stack.create_account(f"rabbit-{uuid.uuid4().hex[:8]}"))
    client.upload("double", """
        def execute(ctx):
            return {"twice": ctx.input["n"] * 2}
    """)
    for n in range(3):
        response = client.invoke("double", input={"n": n}, cache=False)
        assert response.status_code == 200, response.text
        assert response.json()["output"] == {"twice": n * 2}
        assert client.run(response.json()["request_id"])["status"] == "succeeded"
