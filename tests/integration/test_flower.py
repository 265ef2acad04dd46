"""Flower, as `flowpool dev --flower` runs it, tells the truth about runs: a real dev, worker, Flower and HTTP.

One dev for the module, with its own data directory and free ports for its
API and Flower, so a Flower of the developer's on 5555 is left alone.
"""
from __future__ import annotations

import os
import re
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import requests

from flowpool import devstate
from flowpool.procs import free_port
from flowpool.registry import Workflows
from flowpool.run import RunJob
from flowpool.runs import RunStore
from flowpool.sealing import Sealer, ServerKey
from flowpool.settings import Settings
from flowpool.tasks import RUN_TASK, create_celery
from tests.conftest import SESSION_PIDS
from tests.helpers import Client, DevProcess, error_of, eventually

REPO = Path(__file__).resolve().parents[2]

SUCCEEDS = """
    def execute(ctx):
        return {"ok": True}
"""

DIVIDES_BY_ZERO = """
    def execute(ctx):
        return 1 / 0
"""

LEAKS_ITS_SECRET = """
    def execute(ctx):
        raise ValueError("bad token " + ctx.secrets["token"])
"""

SLEEPS = """
    import time

    TIMEOUT_SECONDS = 1

    def execute(ctx):
        time.sleep(30)
        return {}
"""


class FlowerDev(DevProcess):
    """``flowpool dev --flower`` with a data directory and ports of its own; it parses Flower's banner line."""

    def __init__(self) -> None:
        self.data_dir = tempfile.TemporaryDirectory(prefix="flowpool-flower-")
        self.flower_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWPOOL_", "FLOWER_"))}
        env.update(FLOWPOOL_DATA_DIR=self.data_dir.name, FLOWPOOL_HARD_TIMEOUT_GRACE_SECONDS="1",
                   FLOWPOOL_SANDBOX_MEMORY_MB="256")
        super().__init__(free_port(), cwd=REPO, env=env,
                         args=("--flower", "--flower-port", str(self.flower_port)), python_flags=("-I",))
        self.flower_url = ""
        self.flower_auth: tuple[str, str] = ("", "")

    def wait_for_banner(self, timeout: float = 120) -> Client:
        client = super().wait_for_banner(timeout)
        found = re.search(r"^\s+Flower:\s+(\S+)\s+\(user (\S+), password (\S+)\)$", self.output, re.M)
        assert found, self.output
        self.flower_url, self.flower_auth = found.group(1), (found.group(2), found.group(3))
        return client

    def flower(self, path: str, auth: bool = True) -> requests.Response:
        """GET a path of Flower's, with the banner's credentials unless not ``auth``."""
        return requests.get(self.flower_url + path, auth=self.flower_auth if auth else None, timeout=10)


@pytest.fixture(scope="module")
def dev() -> Iterator[FlowerDev]:
    dev = FlowerDev()
    SESSION_PIDS.add(dev.process.pid)  # its processes outlive each test of the module
    try:
        dev.wait_for_banner()
        # Flower shows what happened since it started listening to the worker's events: since it saw a heartbeat.
        eventually(lambda: dev.flower("/api/workers?status=1").json(), timeout=30, what="Flower hears the worker")
        yield dev
    finally:
        dev.kill()
        SESSION_PIDS.discard(dev.process.pid)
        dev.data_dir.cleanup()


def _flower_tasks(dev: FlowerDev, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Flower's view of these runs' tasks once each has ended (succeeded or failed); empty until then."""
    response = dev.flower("/api/tasks")
    assert response.status_code == 200, response.text
    tasks = response.json()
    if any(tasks.get(request_id, {}).get("state") not in ("SUCCESS", "FAILURE") for request_id in request_ids):
        return {}
    return {request_id: tasks[request_id] for request_id in request_ids}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_runs_that_fail_or_time_out_are_failed_tasks_in_flower_with_their_error_and_callers_get_the_same_answers(
        dev: FlowerDev) -> None:
    client = Client(dev.api_url, dev.key)
    for ref, script in [("succeeds", SUCCEEDS), ("divides", DIVIDES_BY_ZERO), ("leaks", LEAKS_ITS_SECRET),
                        ("sleeps", SLEEPS)]:
        client.upload(ref, script)
    secret = f"sk-flower-{uuid.uuid4().hex}"

    succeeded = client.invoke("succeeds")
    failed = client.invoke("divides")
    leaked = client.invoke("leaks", secrets={"token": secret})
    timed_out = client.invoke("sleeps")

    # What callers get is what it always was.
    assert succeeded.status_code == 200 and succeeded.json()["output"] == {"ok": True}, succeeded.text
    assert failed.status_code == 500 and error_of(failed)["type"] == "script_error", failed.text
    assert leaked.status_code == 500 and "bad token [redacted]" in error_of(leaked)["message"], leaked.text
    assert timed_out.status_code == 408 and error_of(timed_out)["type"] == "timeout", timed_out.text
    ids = [response.headers["X-Request-Id"] for response in (succeeded, failed, leaked, timed_out)]
    assert [client.run(request_id)["status"] for request_id in ids] == ["succeeded", "failed", "failed", "timed_out"]

    tasks = eventually(lambda: _flower_tasks(dev, ids), timeout=30, what="Flower saw every run end")
    ok, divided, leaks, slept = (tasks[request_id] for request_id in ids)
    assert (ok["state"], ok["result"]) == ("SUCCESS", "'succeeded'"), ok
    assert divided["state"] == "FAILURE", divided
    # The exception names the request and the error's type; the message, which may echo the caller's data,
    # stays in the run's record.
    assert divided["exception"] == f"ScriptError('{ids[1]}: ZeroDivisionError')", divided
    assert leaks["state"] == "FAILURE", leaks
    assert leaks["exception"] == f"ScriptError('{ids[2]}: ValueError')", leaks
    assert slept["state"] == "FAILURE", slept
    assert slept["exception"] == f"TimeLimitExceeded('{ids[3]}: soft limit 1s')", slept
    # No run's message, nor the secret, is in what Flower holds of the runs (the job's secrets travel sealed),
    # nor in the logs.
    for text in (dev.flower("/api/tasks").text, dev.output):
        assert secret not in text
        assert "division by zero" not in text and "bad token" not in text
    # Celery logs these expected failures at INFO, one line each, with no traceback.
    assert f"raised expected: ScriptError('{ids[1]}: ZeroDivisionError')" in dev.output
    assert "Traceback" not in dev.output, dev.output

    # The worker's row counts them as Flower's dashboard does.
    workers = dev.flower("/workers?json=1")
    assert workers.status_code == 200, workers.text
    [worker] = workers.json()["data"]
    assert (worker.get("task-succeeded"), worker.get("task-failed")) == (1, 3), worker


@pytest.mark.slow
def test_dev_flower_inspects_the_worker_at_start_and_serves_its_api_on_loopback_with_the_banner_password(
        dev: FlowerDev) -> None:
    assert dev.flower_url == f"http://127.0.0.1:{dev.flower_port}"
    # The workers Flower learnt of as it started: empty, and "Inspect method ... failed" logged, when it asked
    # before the worker listened.
    workers = eventually(lambda: dev.flower("/api/workers").json(), timeout=30, what="Flower inspected the worker")
    [(name, info)] = workers.items()
    assert name.startswith("flowpool@")
    assert {"stats", "active_queues", "registered", "conf"} <= set(info), info
    assert "flowpool.run" in info["registered"]
    assert "Inspect method" not in dev.output, dev.output

    assert dev.flower("/api/workers", auth=False).status_code == 401
    assert requests.get(dev.flower_url + "/api/workers", auth=("flowpool", "guessed"), timeout=10).status_code == 401
    # It listens on the loopback address the API listens on, no other.
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.settimeout(5)
        sock.connect(("127.0.0.2", dev.flower_port))


def _deliver_again(dev: FlowerDev, request_id: str) -> None:
    """Send the job of a run that has ended again, under its task id, as a broker redelivering it would."""
    running = devstate.running_dev(Path(dev.data_dir.name))
    assert running is not None
    settings = Settings(redis_url=running.redis_url)
    db = redis.Redis.from_url(settings.redis)
    try:
        record = RunStore.for_settings(db, settings).get(request_id)
        assert record is not None
        workflow = Workflows(db).resolve(record.account, record.workflow)
        job = RunJob(request_id=request_id, account=record.account, workflow=workflow.ref, version=workflow.version,
                     content_hash=workflow.content_hash, soft_seconds=settings.clamp_timeout(workflow.timeout_seconds))
        app = create_celery(settings)
        try:
            app.send_task(RUN_TASK, kwargs={"job": job.to_message(Sealer(ServerKey(db, settings.secret_key)))},
                          task_id=request_id)
        finally:
            app.close()
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_second_delivery_of_a_run_that_ended_leaves_its_task_as_the_first_delivery_reported_it(
        dev: FlowerDev) -> None:
    client = Client(dev.api_url, dev.key)
    client.upload("again-ok", SUCCEEDS)
    client.upload("again-divides", DIVIDES_BY_ZERO)
    # An input of their own: no cache entry of the other tests' runs answers them.
    responses = [client.invoke(ref, input={"nonce": uuid.uuid4().hex}) for ref in ("again-ok", "again-divides")]
    assert [response.status_code for response in responses] == [200, 500], [r.text for r in responses]
    ids = [response.headers["X-Request-Id"] for response in responses]
    first = eventually(lambda: _flower_tasks(dev, ids), timeout=30, what="Flower saw both runs end")
    counts = _worker_counts(dev)

    for request_id in ids:
        _deliver_again(dev, request_id)
    for request_id in ids:
        # The worker took the second delivery (Flower merges its received and started events into the task)
        # and left the run alone, reporting nothing: Celery's Ignore sends no event.
        eventually(lambda: f"Task flowpool.run[{request_id}] ignored" in dev.output, timeout=30,
                   what="the worker ignored the second delivery")
    again = eventually(lambda: _started_again(_flower_tasks(dev, ids), first), timeout=30,
                       what="Flower saw the second deliveries start")

    ok, divided = (again[request_id] for request_id in ids)
    assert (ok["state"], ok["result"]) == ("SUCCESS", "'succeeded'"), ok
    assert (divided["state"], divided["exception"]) == ("FAILURE", f"ScriptError('{ids[1]}: ZeroDivisionError')")
    assert _worker_counts(dev) == counts
    assert [client.run(request_id)["status"] for request_id in ids] == ["succeeded", "failed"]


def _worker_counts(dev: FlowerDev) -> tuple[Any, Any]:
    """The worker row's Succeeded and Failed counts, as Flower's dashboard shows them."""
    workers = dev.flower("/workers?json=1")
    assert workers.status_code == 200, workers.text
    [worker] = workers.json()["data"]
    return worker.get("task-succeeded"), worker.get("task-failed")


def _started_again(tasks: dict[str, dict[str, Any]], first: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``tasks`` once each has started again since ``first`` was seen; empty until then."""
    return tasks if tasks and all(tasks[i]["started"] != first[i]["started"] for i in first) else {}
