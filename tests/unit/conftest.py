"""Fixtures of the unit tests that drive the worker's side against a real Redis."""
from __future__ import annotations

from typing import Iterator

import pytest
import redis

from flowpool.redis_server import RedisServer
from flowpool.settings import Settings
from flowpool.tasks.worker import WorkerRuntime


@pytest.fixture
def runtime(redis_server: RedisServer, redis_db: redis.Redis) -> Iterator[WorkerRuntime]:
    """A worker's runtime on the session's Redis (database 15, flushed per test), its sandbox not started."""
    runtime = WorkerRuntime(Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", sandbox_prestart=0),
                            name="worker-a")
    yield runtime
    runtime.redis.close()
