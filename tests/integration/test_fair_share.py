"""Fair share: one account's backlog does not hold back another account's runs (issue 15).

Each scenario has a stack of its own (its own Redis, one worker of 2 slots):
account A queues 200 runs of a workflow that sleeps 2 s, then account B
queues one. With fair share, B's run goes to lane 0 of the queue while A's
backlog waits in the lower lanes (flowpool.publish), so B's run starts at the
next free slot. With FLOWPOOL_FAIR_SHARE=false, the control, the queue is
plain FIFO and B's run waits behind A's backlog: the same check would fail.
Start times are the run records' own ``started_at``.
"""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import redis
import requests

from flowpool.devstack import Stack
from flowpool.pool import PoolReader
from flowpool.publish import LANES, lane_list
from flowpool.queues import broker_queue
from flowpool.settings import Settings
from tests.conftest import TEST_ENV
from tests.helpers import Client, eventually

FAIR_ENV = {**TEST_ENV, "FLOWPOOL_WORKER_CONCURRENCY": "2",
            # Nothing in A's backlog expires or is given up on while the test looks.
            "FLOWPOOL_QUEUE_WAIT_SECONDS": "600"}
UID_BASES = {True: "121000", False: "121100"}  # each stack's sandbox uids, away from the other tests' workers

BACKLOG = 200
RUN_SECONDS = 2.0
# How long after it was queued B's run may start: a slot frees within RUN_SECONDS, plus a run's start-up on a
# loaded machine. The "starts within a few seconds".
START_BOUND = 8.0

SLOW = """
    import time

    def execute(ctx):
        time.sleep(ctx.input["seconds"])
        return {"n": ctx.input["n"]}
"""


@contextmanager
def _fair_stack(fair: bool) -> Iterator[Stack]:
    """A Redis of its own, an API and one 2-slot worker, with fair share on or off."""
    stack = Stack(env={**FAIR_ENV, "FLOWPOOL_FAIR_SHARE": "true" if fair else "false"})
    try:
        stack.start_worker("--name", f"flowpool@fair-{fair}".lower(), quiet=True,
                           env={"FLOWPOOL_SANDBOX_UID_BASE": UID_BASES[fair]})
        stack.start_api(quiet=True)
        stack.wait_ready()
        yield stack
    finally:
        stack.stop(timeout=10)


def _account(stack: Stack, name: str) -> Client:
    assert stack.api_url is not None
    client = Client(stack.api_url, stack.create_account(f"{name}-{uuid.uuid4().hex[:6]}"))
    client.upload("slow", SLOW, timeout_seconds=30)
    return client


def _fire(client: Client, n: int) -> None:
    """Queue one run without waiting for it (POST /api/v1/runs)."""
    response = client.post("/api/v1/runs", timeout=10,
                           json={"model": "workflow:slow", "cache": False, "input": {"seconds": RUN_SECONDS, "n": n}})
    assert response.status_code == 202, response.text


def _runs(client: Client) -> list[dict[str, Any]]:
    """Every run of the account's workflow, as GET /api/v1/workflows/slow/runs lists them (a page at a time)."""
    runs: list[dict[str, Any]] = []
    while True:
        page = client.get("/api/v1/workflows/slow/runs", params={"offset": len(runs), "limit": 100}).json()
        runs += page["data"]
        if len(runs) >= page["pagination"]["total"] or not page["data"]:
            return runs


def _queue_backlog(stack: Stack, a: Client) -> list[dict[str, Any]]:
    """A's runs, once all BACKLOG of them are queued (their records written at admission)."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: _fire(a, n), range(BACKLOG)))

    def all_queued() -> list[dict[str, Any]] | None:
        runs = _runs(a)
        return runs if len(runs) == BACKLOG else None

    return eventually(all_queued, 30, "A's backlog is queued")


def _b_run(b: Client) -> dict[str, Any] | None:
    runs = _runs(b)
    return runs[0] if runs else None


def _started_before(runs: list[dict[str, Any]], at: float) -> int:
    return sum(1 for run in runs if run["started_at"] is not None and run["started_at"] < at)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_another_accounts_run_starts_at_the_next_free_slot_not_behind_a_backlog() -> None:
    with _fair_stack(fair=True) as stack:
        a, b = _account(stack, "heavy"), _account(stack, "light")
        _queue_backlog(stack, a)

        # Autoscaling sees the whole backlog, whatever lane it waits in: all of it waits, is fetched or runs.
        pool = requests.get(f"{stack.api_url}/api/v1/pool", timeout=10).json()["queues"]["default"]
        started = _started_before(_runs(a), float("inf"))  # read after the pool: only ever grows
        assert pool["queued"] + pool["reserved"] + started >= BACKLOG, pool
        assert pool["queued"] > BACKLOG // 2, pool  # most of it still waits: 2 slots take a run each 2 s

        _fire(b, 0)
        run = eventually(lambda: (r := _b_run(b)) and r["started_at"] is not None and r,
                         START_BOUND + 10, "B's run starts")
        waited = run["started_at"] - run["queued_at"]
        assert waited < START_BOUND, f"B's run started {waited:.1f}s after it was queued"
        a_runs = _runs(a)
        before_b_queued = _started_before(a_runs, run["queued_at"])
        before_b_started = _started_before(a_runs, run["started_at"])
        # Only the runs already going when B came, and what the 2 slots took while B was being queued.
        assert before_b_started <= before_b_queued + 2, (before_b_queued, before_b_started)
        assert before_b_started < BACKLOG // 4


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_without_fair_share_the_run_waits_behind_the_backlog() -> None:
    """The control: the same scenario with FLOWPOOL_FAIR_SHARE=false is plain FIFO, and the check above fails."""
    with _fair_stack(fair=False) as stack:
        a, b = _account(stack, "heavy"), _account(stack, "light")
        _queue_backlog(stack, a)
        _fire(b, 0)
        queued = eventually(lambda: _b_run(b), 10, "B's run is queued")
        started_then = _started_before(_runs(a), float("inf"))
        # Longer than the fair run needs to start (a slot frees within RUN_SECONDS); FIFO, B has 200 runs ahead.
        time.sleep(2 * RUN_SECONDS + 1)
        assert _b_run(b)["started_at"] is None, "B's run started although A's backlog was queued first"
        assert _started_before(_runs(a), float("inf")) > started_then, "the worker went on with A's backlog"
        assert queued["status"] == "queued"


def test_the_pool_counts_every_lane_of_a_queue(redis_server: Any, redis_db: redis.Redis) -> None:
    """A queue's runs wait in one list per lane on a Redis broker: the demand signal counts them all."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15")
    for n, lane in enumerate(LANES):
        redis_db.lpush(lane_list(broker_queue("default"), lane), *[f"m{i}" for i in range(n + 1)])
    redis_db.lpush(lane_list(broker_queue("heavy"), 9), "m")

    lengths = PoolReader(settings, redis_db).queue_lengths(["default", "heavy", "gpu"])

    assert lengths == {"default": 1 + 2 + 3 + 4, "heavy": 1, "gpu": 0}
