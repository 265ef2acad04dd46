"""A request's secrets never leave in clear: not in records, streams, cache entries, broker messages or logs.

Each test sends a long random secret and then looks for it everywhere the
run could have left it: the run record and its event stream as served over
HTTP, every key and value of every Redis database (Celery message bodies
decoded from base64), and the output of the worker and API processes.
"""
from __future__ import annotations

import json
import signal
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import requests

from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer
from tests.conftest import TEST_ENV
from tests.helpers import Client, error_of, every_value_in, eventually

# The secret as a dict key, a chunk type, a log field's name, in a log message and in an error.
USES_SECRET_EVERYWHERE = """
    def execute(ctx):
        secret = ctx.secrets["token"]
        ctx.emit("t-" + secret, {secret: "as a key"})
        ctx.log.info("seen " + secret, **{secret: 1, "field": "x" + secret})
        if ctx.input.get("fail"):
            raise KeyError("bad token " + secret)  # a traceback shows a KeyError's repr
        return {secret: 1, "nested": [{"k-" + secret: secret[::-1]}]}
"""


def _secret(awkward: bool = False) -> str:
    """A long random secret; an awkward one holds what JSON and a repr escape (quote, backslash, control, non-ASCII)."""
    if awkward:
        return f'sk-"live\\{uuid.uuid4().hex}\t\u00e9{uuid.uuid4().hex}'
    return f"sk-live-{uuid.uuid4().hex}{uuid.uuid4().hex}"


def _spellings(secret: str) -> set[bytes]:
    """The secret as written, and as JSON (ASCII-only or not) and a repr escape it."""
    return {text.encode() for text in (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
                                       repr(secret)[1:-1])}


def _everything_served(client: Client, request_id: str) -> str:
    """The run's record and its whole event stream, as the API serves them."""
    record = client.get(f"/api/v1/runs/{request_id}", params={"full": "true"})
    assert record.status_code == 200, record.text
    stream = client.get(f"/api/v1/runs/{request_id}/stream", timeout=10)
    assert stream.status_code == 200, stream.text
    return record.text + stream.text


def _in_redis(server: RedisServer, *secrets: str) -> list[bytes]:
    spellings = set().union(*(_spellings(secret) for secret in secrets))
    return [value for value in every_value_in(server) if any(spelling in value for spelling in spellings)]


@pytest.mark.parametrize("awkward", [False, True], ids=["plain", "awkward"])
@pytest.mark.parametrize("fail", [False, True], ids=["succeeds", "fails"])
def test_a_secret_used_as_key_chunk_type_log_field_or_error_text_is_nowhere(
        client: Client, redis_server: RedisServer, fail: bool, awkward: bool) -> None:
    secret = _secret(awkward)
    client.upload("everywhere", USES_SECRET_EVERYWHERE)

    response = client.invoke("everywhere", input={"fail": fail}, secrets={"token": secret})

    if fail:
        assert response.status_code == 500, response.text
        assert error_of(response)["type"] == "script_error"
        assert "bad token [redacted]" in error_of(response)["message"]
    else:
        assert response.status_code == 200, response.text
        # The caller, who sent the secret, gets its clear output.
        assert response.json()["output"] == {secret: 1, "nested": [{"k-" + secret: secret[::-1]}]}
    request_id = response.headers["X-Request-Id"]
    served = _everything_served(client, request_id).encode()
    assert not [spelling for spelling in _spellings(secret) if spelling in served]
    assert b"t-[redacted]" in served and b"seen [redacted]" in served
    assert not _in_redis(redis_server, secret)


# Broker messages and logs: a stack of the test's own, with one run slot, so a
# second run waits in the broker while the first runs; its worker is killed.

SLOW = """
    import time

    def execute(ctx):
        ctx.log.info("holding the only slot")
        time.sleep(30)
        return {"length": len(ctx.secrets["token"])}
"""


@pytest.fixture
def one_slot_stack(tmp_path: Path) -> Iterator[Stack]:
    env = {**TEST_ENV, "FLOWPOOL_WORKER_CONCURRENCY": "1", "FLOWPOOL_QUEUE_WAIT_SECONDS": "8",
           "FLOWPOOL_LOG_LEVEL": "DEBUG"}
    with open(tmp_path / "stack.log", "wb") as output:
        stack = Stack(env=env, output=output).start(quiet=False)
        try:
            yield stack
        finally:
            stack.stop()


def _invoke_in_background(client: Client, secret: str, results: list[Any]) -> threading.Thread:
    def call() -> None:
        try:
            results.append(requests.post(
                client.base_url + "/workflow/chat/completions", headers={"x-api-key": client.key},
                json={"model": "workflow:slow", "input": {"n": secret[-6:]}, "secrets": {"token": secret}},
                timeout=(5, 40)))
        except requests.RequestException as exc:
            results.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_secrets_are_not_in_clear_in_broker_messages_or_logs_even_after_a_worker_dies(
        one_slot_stack: Stack, tmp_path: Path) -> None:
    stack = one_slot_stack
    assert stack.api_url is not None and stack.redis is not None
    client = Client(stack.api_url, stack.create_account("secrets"))
    client.upload("slow", SLOW, timeout_seconds=25)
    running, waiting = _secret(), _secret()
    results: list[Any] = []
    threads = [_invoke_in_background(client, running, results)]
    eventually(lambda: [r for r in client.get("/api/v1/workflows/slow/runs").json()["data"]
                        if r["status"] == "running"], 15, "the first run is running")
    threads.append(_invoke_in_background(client, waiting, results))

    def sealed_messages() -> list[bytes]:
        return [value for value in every_value_in(stack.redis) if b'"sealed_secrets"' in value]

    # The second run's message waits in the broker (queued, or reserved by the busy worker).
    assert eventually(sealed_messages, 15, "the waiting run's message is in Redis")
    assert not _in_redis(stack.redis, running, waiting)

    [worker] = [p for p in stack.processes if "worker" in p.args and p.poll() is None]
    descendants = psutil.Process(worker.pid).children(recursive=True)
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    stack.processes.remove(worker)
    for thread in threads:
        thread.join(60)
    assert len(results) == 2 and all(isinstance(r, requests.Response) for r in results), results
    # What the dead worker left behind (its reserved message, the records) holds no secret either.
    assert not _in_redis(stack.redis, running, waiting)
    logs = (tmp_path / "stack.log").read_text(errors="replace")
    assert "flowpool.run" in logs  # the worker did log the tasks it received, at DEBUG
    assert running not in logs and waiting not in logs
    assert not psutil.wait_procs(descendants, timeout=10)[1]  # the sandbox went with its worker


CONCURRENT_SECRET = """
    import time

    def execute(ctx):
        time.sleep(1.5)
        ctx.emit("progress", "about to answer")
        return {"echoed": ctx.secrets["token"]}
"""


def test_streaming_joiners_with_the_same_secrets_all_get_the_clear_output(client: Client,
                                                                          redis_server: RedisServer) -> None:
    secret = _secret(awkward=True)
    client.upload("joined", CONCURRENT_SECRET)
    barrier = threading.Barrier(4)

    def stream(_: int) -> tuple[str, str]:
        barrier.wait(10)
        with requests.post(client.base_url + "/workflow/chat/completions", headers={"x-api-key": client.key},
                           json={"model": "workflow:joined", "input": {"q": 1}, "secrets": {"token": secret},
                                 "stream": True}, stream=True, timeout=30) as response:
            assert response.status_code == 200, response.text
            return response.headers["X-Cache"], response.text

    results: list[tuple[str, str]] = []
    threads = [threading.Thread(target=lambda i=i: results.append(stream(i))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert len(results) == 4
    assert sorted(cache for cache, _ in results) == ["HIT", "HIT", "HIT", "MISS"]  # one run, three joined it
    for _, text in results:
        finals = [json.loads(line[6:]) for line in text.splitlines()
                  if line.startswith("data: {") and '"chat.completion' in line]
        assert finals and finals[-1]["output"] == {"echoed": secret}, text
    assert not _in_redis(redis_server, secret)
