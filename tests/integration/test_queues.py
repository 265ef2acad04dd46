"""Worker queues through the whole stack: a workflow's runs go to the workers of the queue it names, and only there.

The module's own stack (its Redis, one API) has two workers: one consuming
only ``default``, one only ``heavy``; each run's record names the worker that
ran it. ``scaled`` is an autoscaled queue (FLOWPOOL_AUTOSCALED_QUEUES) that no
worker serves until a test starts one.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import requests

from flowpool.devstack import Stack
from flowpool.queues import broker_queue
from tests.conftest import TEST_ENV
from tests.helpers import REPO, Client, error_of, eventually

QUEUES_ENV = {**TEST_ENV, "FLOWPOOL_AUTOSCALED_QUEUES": "scaled", "FLOWPOOL_WORKER_CONCURRENCY": "2"}
# Each worker its own block of sandbox uids, away from the session's workers and the other sandbox tests.
UID_BASES = {"default": "118000", "heavy": "118100", "scaled": "118200"}
DEFAULT_WORKER, HEAVY_WORKER, SCALED_WORKER = "flowpool@queue-default", "flowpool@queue-heavy", "flowpool@queue-scaled"

ECHO = 'def execute(ctx):\n    return {"echo": ctx.input}\n'


def _start_worker(stack: Stack, queues: str, name: str) -> subprocess.Popen[bytes]:
    return stack.start_worker("--queues", queues, "--name", name, quiet=True,
                              env={"FLOWPOOL_SANDBOX_UID_BASE": UID_BASES[queues]})


@pytest.fixture(scope="module")
def queue_stack() -> Iterator[Stack]:
    """A Redis, an API, a worker consuming only ``default`` and one consuming only ``heavy``."""
    stack = Stack(env=QUEUES_ENV)
    try:
        _start_worker(stack, "default", DEFAULT_WORKER)
        _start_worker(stack, "heavy", HEAVY_WORKER)
        stack.start_api(quiet=True)
        stack.wait_ready(workers=2)
        yield stack
    finally:
        stack.stop(timeout=20)


@pytest.fixture
def qclient(queue_stack: Stack) -> Client:
    assert queue_stack.api_url is not None
    return Client(queue_stack.api_url, queue_stack.create_account(f"queues-{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def broker(queue_stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(queue_stack.redis_url)
    yield client
    client.close()


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _workers_of(client: Client, ref: str, runs: int = 6) -> set[str]:
    """The workers that ran ``runs`` uncached invocations of ``ref``."""
    found = set()
    for n in range(runs):
        response = client.invoke(ref, input={"n": n}, cache=False)
        assert response.status_code == 200, response.text
        found.add(client.run(response.json()["request_id"])["worker"])
    return found


def test_a_workflow_naming_heavy_runs_only_on_the_heavy_worker_and_a_default_one_never_there(
        qclient: Client) -> None:
    heavy, plain = _ref("heavy"), _ref("plain")
    uploaded = qclient.upload(heavy, 'QUEUE = "heavy"\n' + ECHO)
    assert uploaded["workflow"]["queue"] == "heavy" and uploaded["version"]["queue"] == "heavy"
    assert qclient.upload(plain, ECHO)["workflow"]["queue"] == "default"
    assert qclient.get(f"/api/v1/workflows/{heavy}").json()["data"]["queue"] == "heavy"
    assert qclient.get(f"/api/v1/workflows/{heavy}/versions").json()["data"][0]["queue"] == "heavy"

    before = _finished_on(qclient, "heavy")
    assert _workers_of(qclient, heavy) == {HEAVY_WORKER}
    assert _workers_of(qclient, plain) == {DEFAULT_WORKER}
    assert _finished_on(qclient, "heavy") == before + 6  # the metrics count runs per queue too


def _finished_on(client: Client, queue: str) -> float:
    """flowpool_queue_runs_finished_total of ``queue``'s succeeded runs, as /metrics says now."""
    text = client.get("/metrics").text
    series = f'flowpool_queue_runs_finished_total{{queue="{queue}",status="succeeded"}} '
    return next((float(line[len(series):]) for line in text.splitlines() if line.startswith(series)), 0.0)


def test_the_upload_queue_field_wins_over_the_script_in_json_and_multipart(qclient: Client) -> None:
    to_heavy, to_default = _ref("to-heavy"), _ref("to-default")
    script = 'QUEUE = "nobody"\n' + ECHO
    assert qclient.upload(to_heavy, script, queue="heavy")["workflow"]["queue"] == "heavy"
    response = qclient.post("/api/v1/workflows/upload", data={"workflow_ref_name": to_default, "queue": "default"},
                            files={"script_file": ("workflow.py", script.encode())})
    assert response.status_code == 201, response.text
    assert response.json()["data"]["workflow"]["queue"] == "default"

    assert _workers_of(qclient, to_heavy, runs=3) == {HEAVY_WORKER}
    assert _workers_of(qclient, to_default, runs=3) == {DEFAULT_WORKER}


def test_flowpool_push_queue_sets_the_queue(qclient: Client, tmp_path: Path) -> None:
    ref = _ref("pushed")
    script = tmp_path / "echo.py"
    script.write_text(ECHO)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    env.update(FLOWPOOL_API_URL=qclient.base_url, FLOWPOOL_API_KEY=qclient.key)
    result = subprocess.run([sys.executable, "-m", "flowpool.cli", "push", str(script), "--name", ref,
                             "--queue", "heavy"], env=env, cwd=REPO, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 0, result.stderr
    assert qclient.get(f"/api/v1/workflows/{ref}").json()["data"]["queue"] == "heavy"


def test_a_queue_no_live_worker_serves_answers_503_at_once_and_queues_nothing(qclient: Client,
                                                                               broker: redis.Redis) -> None:
    ref = _ref("unserved")
    qclient.upload(ref, ECHO, queue="nobody")

    response = qclient.invoke(ref)

    assert response.status_code == 503, response.text
    error = error_of(response)
    # Refused before sending, not after FLOWPOOL_QUEUE_WAIT_SECONDS with no worker taking it.
    assert "queue 'nobody'" in error["message"] and "flowpool worker --queues nobody" in error["message"]
    assert broker.llen(broker_queue("nobody")) == 0
    # Refused in admission, before anything was written: no run record a retry with its Idempotency-Key would find.
    assert qclient.get(f"/api/v1/workflows/{ref}/runs").json()["data"] == []


@pytest.mark.parametrize(("script", "fields", "where"), [
    ('import json\nQUEUE = "Heavy"\n', {}, {"line": 2}),
    ('QUEUE = "heavy" + "x"\n', {}, {"line": 1}),
    ("", {"queue": "Not A Queue"}, {"param": "queue"}),
])
def test_a_bad_queue_name_is_a_400_naming_where(qclient: Client, script: str, fields: dict[str, Any],
                                                where: dict[str, Any]) -> None:
    response = qclient.post("/api/v1/workflows/upload", json={
        "workflow_ref_name": _ref("bad"), "script": script + ECHO, **fields})
    assert response.status_code == 400, response.text
    error = error_of(response)
    if "line" in where:
        assert [e["line"] for e in error["errors"]] == [where["line"]] and "QUEUE must be" in error["message"]
    else:
        assert error["param"] == "queue"


def test_a_run_for_an_autoscaled_queue_waits_queued_until_a_worker_for_it_starts(
        queue_stack: Stack, qclient: Client, broker: redis.Redis) -> None:
    ref = _ref("scaled")
    qclient.upload(ref, 'QUEUE = "scaled"\n' + ECHO)
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["response"] = qclient.invoke(ref, input={"x": 1})
        except requests.RequestException as exc:
            result["exception"] = exc

    thread = threading.Thread(target=call, name="invoke-scaled", daemon=True)
    thread.start()
    eventually(lambda: broker.llen(broker_queue("scaled")) == 1, 10, "the run queued for the scaled queue")
    worker = _start_worker(queue_stack, "scaled", SCALED_WORKER)
    try:
        thread.join(60)
        assert not thread.is_alive(), "the invoke did not end"
        response = result["response"]
        assert response.status_code == 200, response.text
        assert response.json()["output"] == {"echo": {"x": 1}}
        assert qclient.run(response.json()["request_id"])["worker"] == SCALED_WORKER
    finally:
        queue_stack.stop_process(worker, timeout=20)


def test_a_nested_call_to_a_heavy_workflow_runs_inline_on_a_default_only_worker(client: Client) -> None:
    """The session's stack has one worker, on ``default`` only: the callee's queue has none, yet the call runs."""
    callee, caller = _ref("heavy-callee"), _ref("caller")
    client.upload(callee, """
        QUEUE = "heavy"

        def execute(ctx):
            return {"doubled": ctx.input["n"] * 2}
    """)
    client.upload(caller, f"""
        def execute(ctx):
            return ctx.workflows.call("{callee}", input={{"n": ctx.input["n"]}})
    """)
    assert client.invoke(callee, input={"n": 1}).status_code == 503  # invoked on its own: nobody serves heavy

    response = client.invoke(caller, input={"n": 21})

    assert response.status_code == 200, response.text
    assert response.json()["output"] == {"doubled": 42}
    run = client.run(response.json()["request_id"])
    assert [(c["workflow"], c["status"]) for c in run["workflow_calls"]] == [(callee, "ok")]
