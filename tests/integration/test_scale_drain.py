"""Scale-in never cuts a run: one of several workers stopped as Kubernetes stops a pod, within its grace period.

Kubernetes scales in by sending one pod SIGTERM, then SIGKILL once
terminationGracePeriodSeconds have passed. The worker's drain
(FLOWPOOL_WORKER_DRAIN_SECONDS) must fit in that grace period and outlast
every run it may hold (the longest hard limit), so that the SIGKILL never
comes: the worker finishes what it holds and exits by itself. Here GRACE
stands for that period, and each test starts three workers on its own Redis,
with runs on all of them, then stops one. A draining worker also takes no new
run, even with a slot free, and stops counting as a worker of its queue in the
demand signal while its runs still count there. The one-worker cases are
tests/integration/test_faults.py's and test_worker_faults.py's.
"""
from __future__ import annotations

import signal
import subprocess
import threading
from typing import Any, Iterator

import pytest
import requests

from flowpool.devstack import Stack
from tests.conftest import TEST_ENV
from tests.helpers import Client, error_of, eventually

pytestmark = pytest.mark.slow

GRACE = 20.0  # stands for the worker pods' terminationGracePeriodSeconds
MAX_TIMEOUT = 12  # the longest soft limit; the drain outlasts it and its hard grace, and fits in GRACE
DRAIN = 16.0

SCALE_ENV = {
    **TEST_ENV,
    "FLOWPOOL_MAX_TIMEOUT_SECONDS": str(MAX_TIMEOUT),
    # A run waits this long for a free slot: the runs queued behind the full workers below must not give up.
    "FLOWPOOL_QUEUE_WAIT_SECONDS": "60",
}

NAPS = """
    import time

    def execute(ctx):
        time.sleep(ctx.input["seconds"])
        return {"tag": ctx.input["tag"]}
"""


class Invocation:
    """A call of ``naps`` made from a thread of its own; ``answer`` waits for it."""

    def __init__(self, client: Client, tag: str, seconds: float, read_timeout: float) -> None:
        self.tag = tag
        self.response: requests.Response | None = None
        self.exception: Exception | None = None
        self._thread = threading.Thread(target=self._call, args=(client, seconds, read_timeout), daemon=True)
        self._thread.start()

    def _call(self, client: Client, seconds: float, read_timeout: float) -> None:
        try:
            self.response = requests.post(
                client.base_url + "/workflow/chat/completions", headers={"x-api-key": client.key},
                json={"model": "workflow:naps", "input": {"tag": self.tag, "seconds": seconds}, "cache": False},
                timeout=(5, read_timeout))
        except requests.RequestException as exc:
            self.exception = exc

    def answer(self, timeout: float) -> requests.Response:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.tag}: no answer in time"
        assert self.exception is None, self.exception
        assert self.response is not None
        return self.response


@pytest.fixture
def stack() -> Iterator[Stack]:
    """This test's own Redis and API; the test starts its workers."""
    stack = Stack(env=SCALE_ENV)
    try:
        yield stack
    finally:
        stack.stop(timeout=GRACE)


def _start_worker(stack: Stack, name: str, concurrency: int, drain: float) -> subprocess.Popen[bytes]:
    return stack.start_worker("--concurrency", str(concurrency), "--name", name,
                              env={"FLOWPOOL_WORKER_DRAIN_SECONDS": str(drain)}, quiet=True)


def _start_workers(stack: Stack, concurrency: int, drain: float) -> dict[str, subprocess.Popen[bytes]]:
    workers = {f"flowpool@w{n}": _start_worker(stack, f"flowpool@w{n}", concurrency, drain) for n in range(3)}
    stack.start_api(quiet=True)
    stack.wait_ready(workers=3)
    return workers


def _pool(client: Client) -> dict[str, Any]:
    """GET /api/v1/pool (an operator route: the test's API has no admin token and is asked from loopback)."""
    response = client.get("/api/v1/pool")
    assert response.status_code == 200, response.text
    return response.json()


def _pool_dropping(client: Client, leaving: str) -> dict[str, Any] | None:
    """The pool, once two workers serve the default queue or the worker ``leaving`` is gone from it."""
    pool = _pool(client)
    gone = all(worker["name"] != leaving for worker in pool["workers"])
    return pool if pool["queues"]["default"]["workers"] == 2 or gone else None


def _running(client: Client, count: int) -> dict[str, str] | None:
    """The runs of ``naps`` now running, request_id -> the worker that holds it, once there are ``count``."""
    response = client.get("/api/v1/workflows/naps/runs", params={"limit": 100})
    assert response.status_code == 200, response.text
    running = {run["request_id"]: run["worker"] for run in response.json()["data"] if run["status"] == "running"}
    return running if len(running) == count else None


def _scale_in(stack: Stack, workers: dict[str, subprocess.Popen[bytes]], name: str) -> subprocess.Popen[bytes]:
    """SIGTERM one worker, as Kubernetes does to the pod it scales in; the stack forgets it."""
    process = workers.pop(name)
    stack.processes.remove(process)
    process.send_signal(signal.SIGTERM)
    return process


@pytest.mark.timeout(180)
def test_a_worker_scaled_in_finishes_every_run_it_holds_takes_no_new_one_and_exits_within_the_grace_period(
        stack: Stack) -> None:
    assert MAX_TIMEOUT + float(SCALE_ENV["FLOWPOOL_HARD_TIMEOUT_GRACE_SECONDS"]) < DRAIN < GRACE
    # Two workers of two slots first, each made to hold two long runs; then the victim, with three slots, which
    # alone has free slots: it takes the next two runs and keeps one slot free.
    workers = {name: _start_worker(stack, name, 2, DRAIN) for name in ("flowpool@w1", "flowpool@w2")}
    stack.start_api(quiet=True)
    stack.wait_ready(workers=2)
    assert stack.api_url is not None
    client = Client(stack.api_url, stack.create_account("scale"))
    client.upload("naps", NAPS, timeout_seconds=MAX_TIMEOUT)
    busy = {f"busy{n}": Invocation(client, f"busy{n}", seconds=MAX_TIMEOUT - 1, read_timeout=60) for n in range(4)}
    running = eventually(lambda: _running(client, 4), 30, "four runs running")
    assert set(running.values()) == set(workers), "two runs on each of the first workers"
    victim_name = "flowpool@w0"
    workers[victim_name] = _start_worker(stack, victim_name, 3, DRAIN)
    stack.wait_ready(workers=3)
    first = {f"first{n}": Invocation(client, f"first{n}", seconds=4, read_timeout=60) for n in range(2)}
    running = eventually(lambda: _running(client, 6), 30, "six runs running")
    held = {request_id for request_id, worker in running.items() if worker == victim_name}
    assert len(held) == 2, running

    victim = _scale_in(stack, workers, victim_name)
    # Queued while the other workers' slots are all taken: the victim's free slot is the only one, and a
    # draining worker must leave them to the workers that stay.
    after = {f"after{n}": Invocation(client, f"after{n}", seconds=1, read_timeout=60) for n in range(4)}

    # While it drains, the demand signal no longer counts it as a worker of `default`, but counts its runs.
    # (Read until it drops to two workers or the victim is gone from the pool: the victim's exit ends the wait.)
    pool = eventually(lambda: _pool_dropping(client, victim_name), 60, "the pool without the draining worker")
    reports = [w for w in pool["workers"] if w["name"] == victim_name]
    assert reports, "the pool counted the draining worker as serving default until it exited"
    assert pool["queues"]["default"]["workers"] == 2
    assert reports[0]["running"] == {"default": 2}, "the draining worker's runs no longer counted"
    assert pool["queues"]["default"]["running"] >= 2
    assert victim.poll() is None, "still draining"

    for tag, call in {**busy, **first}.items():
        response = call.answer(60)
        assert response.status_code == 200, (tag, response.text)
        assert response.json()["output"] == {"tag": tag}
        record = client.run(response.json()["request_id"])
        assert record["status"] == "succeeded"
        assert (record["worker"] == victim_name) == (record["request_id"] in held)
    for tag, call in after.items():
        response = call.answer(60)
        assert response.status_code == 200, (tag, response.text)
        assert client.run(response.json()["request_id"])["worker"] in workers, f"{tag} ran on the stopped worker"
    # By itself and cleanly, before the grace period would have ended in a SIGKILL.
    assert victim.wait(GRACE) == 0


@pytest.mark.timeout(180)
def test_a_run_longer_than_the_drain_is_lost_on_that_worker_alone_and_the_worker_exits_within_the_grace_period(
        stack: Stack) -> None:
    drain = 3.0  # shorter than the run: a drain set below the longest hard limit
    workers = _start_workers(stack, concurrency=1, drain=drain)
    assert stack.api_url is not None
    client = Client(stack.api_url, stack.create_account("scale"))
    client.upload("naps", NAPS, timeout_seconds=MAX_TIMEOUT)
    # Each run outlasts the drain.
    calls = {f"long{n}": Invocation(client, f"long{n}", seconds=MAX_TIMEOUT - 1, read_timeout=60) for n in range(3)}
    running = eventually(lambda: _running(client, 3), 30, "three runs running")
    assert set(running.values()) == set(workers), "a run on every worker"
    victim_name = next(iter(workers))
    [cut] = [request_id for request_id, worker in running.items() if worker == victim_name]

    victim = _scale_in(stack, workers, victim_name)
    # Its drain ends before its run does: it kills the run and exits, before the grace period's SIGKILL.
    assert victim.wait(GRACE) == 0

    answers = {tag: call.answer(60) for tag, call in calls.items()}
    [lost] = [response for response in answers.values() if response.headers.get("X-Request-Id") == cut]
    assert lost.status_code == 500, lost.text
    error = error_of(lost)
    assert error["type"] == "worker_lost"
    assert client.run(cut)["status"] == "lost"
    # The other workers' runs went on untouched, and succeeded.
    for tag, response in answers.items():
        if response is not lost:
            assert response.status_code == 200, (tag, response.text)
            assert client.run(response.json()["request_id"])["worker"] in workers
