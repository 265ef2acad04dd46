"""Faults of the parts around a run: a worker killed mid-run, Redis gone, no worker at all.

Each test starts its own stack (its own Redis, one worker, one API), because
it breaks it. Short settings make a dead worker noticed within seconds: a
heartbeat every 0.5 s, a worker and its leases taken for dead after 2 s, a
run waiting at most 5 s for a worker. "Quickly" and "well before the time
limit" are asserted through the HTTP client's timeouts, never by timing.
"""
from __future__ import annotations

import signal
import subprocess
import threading
from typing import Any, Iterator

import psutil
import pytest
import requests

from flowpool.devstack import Stack
from tests.conftest import TEST_ENV
from tests.helpers import Client, error_of, eventually

pytestmark = pytest.mark.slow

FAULT_ENV = {
    **TEST_ENV,
    "FLOWPOOL_WORKER_TTL_SECONDS": "2",
    "FLOWPOOL_WORKER_HEARTBEAT_SECONDS": "0.5",
    "FLOWPOOL_QUEUE_WAIT_SECONDS": "5",
}

# Longer than its soft limit of 20 s, which is longer than any client timeout below.
SLEEPS = """
    import time

    def execute(ctx):
        ctx.log.info("going to sleep")
        time.sleep(30)
        return {"slept": True}
"""

ECHO = """
    def execute(ctx):
        return {"echo": ctx.input}
"""


@pytest.fixture
def stack() -> Iterator[Stack]:
    """A stack of this test's own (its Redis, one worker, one API), in place of the session's."""
    stack = Stack(env=FAULT_ENV).start()
    try:
        yield stack
    finally:
        stack.stop()


def _worker(stack: Stack) -> subprocess.Popen[bytes]:
    [worker] = [p for p in stack.processes if "worker" in p.args and p.poll() is None]
    return worker


def _forget(stack: Stack, process: subprocess.Popen[bytes]) -> None:
    """Drop a process the test ended from the stack, so ``wait_ready`` does not take it for a failed start."""
    stack.processes.remove(process)


def _readiness(stack: Stack) -> int:
    assert stack.api_url is not None
    return requests.get(stack.api_url + "/readyz", timeout=5).status_code


def _runs(client: Client, ref: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/workflows/{ref}/runs", params={"limit": 100})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _invoke_in_background(client: Client, ref: str, timeout: float) -> tuple[threading.Thread, dict[str, Any]]:
    """Invoke ``ref`` from a thread; the result dict gets ``response`` or ``exception``."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["response"] = requests.post(
                client.base_url + "/workflow/chat/completions", headers={"x-api-key": client.key},
                json={"model": f"workflow:{ref}", "input": {}}, timeout=(5, timeout))
        except requests.RequestException as exc:
            result["exception"] = exc

    thread = threading.Thread(target=call, name="invoke", daemon=True)
    thread.start()
    return thread, result


def test_worker_killed_mid_run_gives_500_worker_lost_before_the_time_limit(stack: Stack, client: Client) -> None:
    client.upload("sleeper", SLEEPS, timeout_seconds=20)
    # A 408 would come after the 20 s soft limit: the read timeout turns that into a failure here.
    thread, result = _invoke_in_background(client, "sleeper", timeout=15)
    [run] = eventually(lambda: [r for r in _runs(client, "sleeper") if r["status"] == "running"], 15,
                        "the run is running")
    worker = _worker(stack)
    descendants = psutil.Process(worker.pid).children(recursive=True)
    assert descendants, "the worker has no sandbox processes"
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    _forget(stack, worker)
    thread.join(30)
    assert not thread.is_alive()
    assert "exception" not in result, result.get("exception")
    response = result["response"]
    assert response.status_code == 500, response.text
    error = error_of(response)
    assert error["type"] == "worker_lost"
    assert error["request_id"] == response.headers["X-Request-Id"] == run["request_id"]
    record = client.run(run["request_id"])
    assert record["status"] == "lost"
    assert record["error"]["message"] == error["message"]
    # The zygote and the run process die with the worker: they have a parent-death signal.
    gone, alive = psutil.wait_procs(descendants, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_redis_down_gives_503_with_retry_after_quickly(stack: Stack, client: Client) -> None:
    client.upload("echo", ECHO)
    warm = client.invoke("echo", input={"warm": True})  # pooled connections exist when Redis goes
    assert warm.status_code == 200, warm.text
    assert stack.redis is not None
    stack.redis.stop()
    response = client.post("/workflow/chat/completions", json={"model": "workflow:echo", "input": {"cold": 1}},
                           timeout=(3, 8))
    assert response.status_code == 503, response.text
    assert error_of(response)["type"] == "service_unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert stack.api_url is not None
    assert requests.get(stack.api_url + "/healthz", timeout=5).status_code == 200
    assert _readiness(stack) == 503


def test_no_worker_gives_503_with_retry_after_and_runs_nothing_later(stack: Stack, client: Client) -> None:
    client.upload("echo", ECHO)
    stack.stop_process(_worker(stack))
    eventually(lambda: _readiness(stack) == 503, 15, "/readyz says 503 without a worker")

    response = client.post("/workflow/chat/completions", json={"model": "workflow:echo", "input": {"n": 1}},
                           timeout=(3, 15))
    assert response.status_code == 503, response.text
    assert error_of(response)["type"] == "service_unavailable"
    assert int(response.headers["Retry-After"]) > 0
    refused = [r["request_id"] for r in _runs(client, "echo")]

    stack.start_worker(quiet=True)
    stack.wait_ready()
    served = client.invoke("echo", input={"n": 2})  # the queue is FIFO: anything left in it ran before this
    assert served.status_code == 200, served.text
    runs = {r["request_id"]: r["status"] for r in _runs(client, "echo")}
    assert runs == {served.json()["request_id"]: "succeeded", **{i: "expired" for i in refused}}


def test_worker_restarted_after_a_crash_serves_again(stack: Stack, client: Client) -> None:
    client.upload("echo", ECHO)
    assert client.invoke("echo", input={"before": True}).status_code == 200
    worker = _worker(stack)
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    _forget(stack, worker)
    # Its last heartbeat counts until the worker TTL passes.
    eventually(lambda: _readiness(stack) == 503, 15, "/readyz says 503 once the dead worker's heartbeat is stale")

    stack.start_worker(quiet=True)
    stack.wait_ready()
    response = client.invoke("echo", input={"after": True})
    assert response.status_code == 200, response.text
    assert response.json()["output"] == {"echo": {"after": True}}


NAPS = """
    import time

    def execute(ctx):
        time.sleep(1.5)
        return {"napped": True}
"""


def test_warm_shutdown_lets_the_running_run_finish(stack: Stack, client: Client) -> None:
    client.upload("napper", NAPS, timeout_seconds=20)
    thread, result = _invoke_in_background(client, "napper", timeout=15)
    eventually(lambda: [r for r in _runs(client, "napper") if r["status"] == "running"], 15, "the run is running")
    worker = _worker(stack)
    worker.send_signal(signal.SIGTERM)  # what Kubernetes and Ctrl-C send first
    thread.join(30)
    assert "exception" not in result, result.get("exception")
    assert result["response"].status_code == 200, result["response"].text
    assert result["response"].json()["output"] == {"napped": True}
    assert worker.wait(15) == 0
    _forget(stack, worker)
