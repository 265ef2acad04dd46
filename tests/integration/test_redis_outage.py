"""Runs survive short Redis outages: a pause (SIGSTOP), a restart, and runs nobody is left to end.

Each test starts its own Redis server and stack, because it breaks them, and
always lets a paused Redis go on (SIGCONT) in ``finally``. A caller must get
its run's real answer, or a 503 that names the run (``request_id``) and says
not to retry (``x-should-retry: false``): the run was handed to the workers
and may have finished. Afterwards no record may stay ``queued`` or
``running``.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import requests

from flowpool import keys
from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer
from flowpool.registry import Accounts
from flowpool.run import RunRecord, RunStatus
from flowpool.runs import RunStore
from tests.conftest import TEST_ENV
from tests.helpers import Client, eventually

pytestmark = pytest.mark.slow

OUTAGE_ENV = {
    **TEST_ENV,
    "FLOWPOOL_WORKER_TTL_SECONDS": "2",
    "FLOWPOOL_WORKER_HEARTBEAT_SECONDS": "0.5",
    "FLOWPOOL_QUEUE_WAIT_SECONDS": "10",
    "FLOWPOOL_REDIS_OUTAGE_SECONDS": "10",
}

# Emits, naps for input.seconds, emits again, and answers with what it was asked.
NAPS = """
    import time

    def execute(ctx):
        ctx.emit("progress", "napping")
        time.sleep(ctx.input["seconds"])
        ctx.emit("progress", "awake")
        return {"n": ctx.input["n"], "slept": ctx.input["seconds"]}
"""

SLEEPS = """
    import time

    def execute(ctx):
        ctx.emit("progress", "going to sleep")
        time.sleep(30)
        return {"slept": True}
"""


@contextmanager
def own_stack(data_dir: Path | None = None, **settings: str) -> Iterator[tuple[RedisServer, Stack, Client]]:
    """A Redis server (persisting in ``data_dir`` when given), one worker and one API of this test's own, and a
    client of a fresh account."""
    server = RedisServer(data_dir=data_dir).start()
    stack = Stack(env={**OUTAGE_ENV, **settings}, redis_url=server.url)
    try:
        stack.start()
        assert stack.api_url is not None
        yield server, stack, Client(stack.api_url, stack.create_account("outage"))
    finally:
        if server.process is not None and server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
        stack.stop()
        server.stop()


@contextmanager
def paused(server: RedisServer, seconds: float) -> Iterator[None]:
    """Redis stopped (SIGSTOP) from entering the block until ``seconds`` have passed and the block ended."""
    assert server.process is not None
    began = time.monotonic()
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
        time.sleep(max(0.0, seconds - (time.monotonic() - began)))
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def invoke_in_background(client: Client, ref: str, body: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Invoke ``ref`` from a thread; the result dict gets ``status``, ``headers`` and ``body`` (the JSON answer, or
    a stream's events in order), or ``exception``."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            with requests.post(client.base_url + "/workflow/chat/completions", headers={"x-api-key": client.key},
                               json={"model": f"workflow:{ref}", "cache": False, **body},
                               stream=bool(body.get("stream")), timeout=(5, 90)) as response:
                result["status"], result["headers"] = response.status_code, response.headers
                if response.headers.get("Content-Type", "").startswith("text/event-stream"):
                    result["body"] = [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                                      for line in response.iter_lines(decode_unicode=True)
                                      if line.startswith("data: ")]
                else:
                    result["body"] = response.json()
        except requests.RequestException as exc:
            result["exception"] = exc

    thread = threading.Thread(target=call, name=f"invoke-{body.get('input')}", daemon=True)
    thread.start()
    return thread, result


def check_answer(result: dict[str, Any], expected_output: Any) -> str:
    """That a caller got its run's real output, or a 503 naming the run that says not to retry; which of the two."""
    assert "exception" not in result, result["exception"]
    body, headers = result["body"], result["headers"]
    request_id = headers["X-Request-Id"]
    if isinstance(body, list):  # a stream: its chunks, then the completion or an error, then [DONE]
        assert body[-1] == "[DONE]", body
        final = body[-2]
        if "error" in final:
            assert final["error"]["code"] == 503 and final["error"]["request_id"] == request_id, final
            return "unavailable"
        assert final["output"] == expected_output, final
        assert [c["content"] for c in body[:-2]] == ["napping", "awake"], body
        return "answered"
    if result["status"] == 200:
        assert body["output"] == expected_output and body["request_id"] == request_id, body
        return "answered"
    assert result["status"] == 503, body
    assert set(body) == {"error"} and body["error"]["code"] == 503, body
    assert body["error"]["request_id"] == request_id, body
    assert headers["x-should-retry"] == "false", dict(headers)
    return "unavailable"


def started(client: Client, ref: str, count: int) -> bool:
    """Whether ``count`` runs of ``ref`` are recorded and none of them is still queued."""
    runs = client.get(f"/api/v1/workflows/{ref}/runs").json()["data"]
    return len(runs) == count and all(r["status"] != "queued" for r in runs)


def unfinished_runs(server: RedisServer, client: Client, ref: str) -> dict[str, str]:
    """The runs of ``ref`` still queued or running, with their status, read straight from Redis."""
    store_client = redis.Redis(port=server.port)
    try:
        account = Accounts(store_client).authenticate(client.key)
        runs = RunStore(store_client, ttl_seconds=3600, runs_per_workflow=1000)
        ids, _ = runs.list_for_workflow(account.id, ref, 0, 1000)
        records = [r for r in runs.get_many(ids) if r is not None]
        return {r.request_id: r.status for r in records if r.status in ("queued", "running")}
    finally:
        store_client.close()


@pytest.mark.timeout(180)
def test_a_3s_pause_during_slow_runs_gives_every_caller_its_answer_and_leaves_no_run_running() -> None:
    with own_stack() as (server, stack, client):
        client.upload("napper", NAPS, timeout_seconds=20)
        callers = [invoke_in_background(client, "napper", {"input": {"n": n, "seconds": 2 + n % 3},
                                                           "stream": n % 2 == 1})
                   for n in range(8)]
        eventually(lambda: started(client, "napper", 8), 30, "all eight runs have started")
        with paused(server, 3):
            pass
        outcomes = []
        for n, (thread, result) in enumerate(callers):
            thread.join(120)
            assert not thread.is_alive(), f"caller {n} got no answer"
            outcomes.append(check_answer(result, {"n": n, "slept": 2 + n % 3}))
        # A pause this short is ridden out: every caller gets its run's own answer.
        assert outcomes == ["answered"] * 8
        assert unfinished_runs(server, client, "napper") == {}


@pytest.mark.timeout(240)
def test_redis_restarted_under_running_runs_gives_answers_or_503_naming_the_run(tmp_path: Path) -> None:
    with own_stack(data_dir=tmp_path / "redis") as (server, stack, client):
        client.upload("napper", NAPS, timeout_seconds=20)
        callers = [invoke_in_background(client, "napper", {"input": {"n": n, "seconds": 3}, "stream": n % 2 == 1})
                   for n in range(6)]
        eventually(lambda: started(client, "napper", 6), 30, "all six runs have started")
        assert server.process is not None
        server.process.kill()  # stopped at once, as a crash or an OOM kill does
        server.process.wait()
        time.sleep(5)
        server.stop()
        server.start()  # on the same port, with the data it had written out
        outcomes = []
        for n, (thread, result) in enumerate(callers):
            thread.join(150)
            assert not thread.is_alive(), f"caller {n} got no answer"
            outcomes.append(check_answer(result, {"n": n, "slept": 3}))
        assert len(outcomes) == 6
        # Whatever Redis kept, no record it holds is left queued or running.
        store = redis.Redis(port=server.port)
        try:
            statuses = {key: store.hget(key, "status") for key in store.scan_iter(match="fp:run:*")
                        if store.type(key) == b"hash"}
        finally:
            store.close()
        assert not {k: s for k, s in statuses.items() if s in (b"queued", b"running")}, statuses


@pytest.mark.timeout(120)
def test_after_a_6s_pause_new_requests_find_the_live_worker() -> None:
    with own_stack() as (server, stack, client):
        client.upload("napper", NAPS, timeout_seconds=20)
        warm = client.invoke("napper", input={"n": -1, "seconds": 0}, cache=False)
        assert warm.status_code == 200, warm.text
        with paused(server, 6):
            # Sent while Redis is paused: each is served once it is back, behind the same pause as the worker.
            callers = [invoke_in_background(client, "napper", {"input": {"n": n, "seconds": 0}}) for n in range(8)]
            time.sleep(0.5)
        callers += [invoke_in_background(client, "napper", {"input": {"n": n, "seconds": 0}}) for n in range(8, 12)]
        for n, (thread, result) in enumerate(callers):
            thread.join(60)
            assert not thread.is_alive(), f"caller {n} got no answer"
            assert "exception" not in result, result["exception"]
            assert result["status"] == 200, result["body"]
            assert result["body"]["output"] == {"n": n, "slept": 0}


@pytest.mark.timeout(120)
def test_the_reaper_ends_runs_their_worker_and_callers_left() -> None:
    with own_stack(FLOWPOOL_REDIS_OUTAGE_SECONDS="2") as (server, stack, client):
        client.upload("sleeper", SLEEPS, timeout_seconds=3)
        thread, _ = invoke_in_background(client, "sleeper", {"input": {}})
        [run] = eventually(lambda: [r for r in client.get("/api/v1/workflows/sleeper/runs").json()["data"]
                                    if r["status"] == "running"], 15, "the run is running")
        # The API that waited on it and the worker that ran it die together: nobody is left to end the run.
        for process in list(stack.processes):
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            stack.processes.remove(process)
        thread.join(10)
        store_client = redis.Redis(port=server.port)
        try:
            store = RunStore(store_client, ttl_seconds=3600, runs_per_workflow=1000)
            account = Accounts(store_client).authenticate(client.key)
            # And a run whose message the broker lost: queued, never taken, nobody waiting.
            rev = (store_client.hget(keys.workflow(account.id, "sleeper"), "rev") or b"").decode()
            never_taken = RunRecord(request_id="req_never_taken", account=account.id, workflow="sleeper",
                                    status=RunStatus.QUEUED, version="1.0.0", queued_at=time.time())
            state, _ = store.begin(never_taken, lock_seconds=1, rev=rev)
            assert state == "queued"
            assert store.get(run["request_id"]).status == "running"  # type: ignore[union-attr]

            stack.start_worker(quiet=True)  # another worker (or API) comes by and ends them
            lost = eventually(lambda: (r := store.get(run["request_id"])) is not None and r.status != "running" and r,
                              60, "the abandoned run is ended")
            assert lost.status == "lost"
            assert lost.error["kind"] == "WorkerLost" and "past its hard time limit" in lost.error["message"]
            expired = eventually(lambda: (r := store.get("req_never_taken")) is not None and r.status != "queued" and r,
                                 30, "the run nobody took is ended")
            assert expired.status == "expired" and expired.error["kind"] == "RunNotStarted"
        finally:
            store_client.close()


@pytest.mark.timeout(180)
def test_redis_down_past_the_deadline_gives_503_naming_the_run_and_the_reaper_ends_it(tmp_path: Path) -> None:
    with own_stack(data_dir=tmp_path / "redis", FLOWPOOL_QUEUE_WAIT_SECONDS="3",
                   FLOWPOOL_REDIS_OUTAGE_SECONDS="2") as (server, stack, client):
        client.upload("napper", NAPS, timeout_seconds=4)
        callers = [invoke_in_background(client, "napper", {"input": {"n": n, "seconds": 3.5}, "stream": n % 2 == 1})
                   for n in range(4)]
        # Each run has stored its first chunk: a streamed caller then has its 200 and the chunk before Redis goes
        # (a run cut off between its claim and its first chunk answers a plain 503, as it should, but not here).
        eventually(lambda: [(r["status"], bool(client.run(r["request_id"])["chunks"]))
                            for r in client.get("/api/v1/workflows/napper/runs").json()["data"]]
                   == [("running", True)] * 4, 30, "all four runs are running and have emitted their first chunk")
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        # Longer than any caller waits: the queue wait, the run's deadline and the outage margin (3 + 7 + 2 s),
        # and the last try of a call to Redis, which takes a few seconds against a server that is down.
        time.sleep(20)
        server.stop()
        server.start()
        request_ids = []
        for n, (thread, result) in enumerate(callers):
            thread.join(60)
            assert not thread.is_alive(), f"caller {n} got no answer"
            assert check_answer(result, {"n": n, "slept": 3.5}) == "unavailable"
            if n % 2 == 1:
                assert result["status"] == 200 and "workflow.chunk" in json.dumps(result["body"][0])
            request_ids.append(result["headers"]["X-Request-Id"])
        # Nobody could write their ends; the reaper does, once Redis is back, with the reason.
        for request_id in request_ids:
            record = eventually(lambda: (r := client.run(request_id))["status"] not in ("queued", "running") and r,
                                30, f"run {request_id} is ended")
            assert record["status"] == "lost", record
            assert "past its hard time limit" in record["error"]["message"]
