"""Per-account limits over HTTP against real workers (issue 15): a 429 with Retry-After over any limit, nothing
queued, and the concurrency slot back after every kind of end.

Limits are set as the operator's tools set them, in the account's limits hash (``keys.account_limits``).
"""
from __future__ import annotations

import signal
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import redis
import requests

from flowpool import keys
from flowpool.devstack import Stack
from flowpool.publish import LANES, lane_list
from flowpool.queues import BROKER_QUEUE
from flowpool.quotas import seconds_to_midnight
from flowpool.redis_server import RedisServer
from flowpool.usage import day_of
from tests.conftest import TEST_ENV, second_api
from tests.helpers import Client, account_id, error_of, eventually, sse_events
from tests.provider import StandInProvider

SLOW = """
    import time

    def execute(ctx):
        time.sleep(ctx.input.get("seconds", 0))
        if ctx.input.get("fail"):
            raise RuntimeError("asked to fail")
        return {"slept": ctx.input.get("seconds", 0)}
"""

ASKS = """
    APPLICATION = "{app}"

    def execute(ctx):
        resp = ctx.chat.completions.create(intent="answer", messages=[{{"role": "user", "content": "hi there"}}])
        return resp["usage"]
"""


EMITS_THEN_SLEEPS = """
    import time

    def execute(ctx):
        ctx.emit("progress", "started")
        time.sleep(ctx.input.get("seconds", 0))
        return {"slept": True}
"""


def _ref(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _limit(db: redis.Redis, client: Client, **values: int) -> str:
    """Give the client's account its own limits; its id."""
    account = account_id(db, client)
    db.hset(keys.account_limits(account), mapping=values)
    return account


def _slots(db: redis.Redis, account: str) -> int:
    """The account's slots not lapsed."""
    return db.zcount(keys.account_slots(account), time.time(), "+inf")


def _status(client: Client, request_id: str) -> str:
    """A run's status, as GET /api/v1/runs/{id} shows it."""
    return client.run(request_id)["status"]


def _running(client: Client, db: redis.Redis, account: str) -> bool:
    """Whether one of the account's runs holding a slot has been claimed by a worker."""
    return any(_status(client, rid.decode()) == "running" for rid in db.zrange(keys.account_slots(account), 0, -1))


def _waiting(db: redis.Redis) -> int:
    """Messages waiting in the default queue's broker lists, every lane."""
    return sum(db.llen(lane_list(BROKER_QUEUE, lane)) for lane in LANES)


def _check_refused(response: requests.Response, limit: str, *words: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["x-should-retry"] == "true"
    error = error_of(response)
    assert error["type"] == "rate_limit_exceeded" and error["limit"] == limit
    assert error["used"] >= error["allowed"] or limit == "rpm"
    for word in words:
        assert word in error["message"], error["message"]
    return error


@contextmanager
def _holding(client: Client, db: redis.Redis, account: str, ref: str, seconds: float = 4) -> Iterator[list[Any]]:
    """A run of ``ref`` going (claimed by a worker) for the block: it holds one of the account's slots."""
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(client.invoke(ref, input={"seconds": seconds})),
                              daemon=True)
    thread.start()
    eventually(lambda: _running(client, db, account), 20, "the holding run started")
    try:
        yield answers
    finally:
        thread.join(60)
        assert answers and answers[0].status_code == 200, answers


def _refused_and_nothing_queued(client: Client, db: redis.Redis, account: str, ref: str, limit: str,
                                *words: str) -> requests.Response:
    runs_before = db.zcard(keys.workflow_runs(account, ref))
    slots_before, waiting_before = _slots(db, account), _waiting(db)
    response = client.invoke(ref, input={"seconds": 0})
    _check_refused(response, limit, *words)
    assert db.zcard(keys.workflow_runs(account, ref)) == runs_before  # no run record
    assert _slots(db, account) == slots_before
    assert _waiting(db) == waiting_before == 0  # no broker message
    return response


def test_over_the_concurrency_limit_a_429_says_so_and_nothing_is_queued(client: Client,
                                                                      stack_db: redis.Redis) -> None:
    account, ref = _limit(stack_db, client, concurrency=1), _ref("slow")
    client.upload(ref, SLOW)
    with _holding(client, stack_db, account, ref):
        response = _refused_and_nothing_queued(client, stack_db, account, ref, "concurrency",
                                               "concurrency limit: 1 of 1 runs")
        assert response.headers["Retry-After"] == "1"
    assert client.invoke(ref, input={"seconds": 0}).status_code == 200  # its slot came back


def test_over_the_rate_a_429_tells_when_to_come_back(client: Client, stack_db: redis.Redis) -> None:
    account, ref = _limit(stack_db, client, rpm=2), _ref("quick")
    client.upload(ref, SLOW)
    assert [client.invoke(ref, input={"seconds": 0}).status_code for _ in range(2)] == [200, 200]

    response = _refused_and_nothing_queued(client, stack_db, account, ref, "rpm", "rate limit", "2 of 2")

    assert 1 <= int(response.headers["Retry-After"]) <= 30  # one request every 30 s after the burst


def test_the_token_budget_lets_a_run_crossing_it_finish_and_refuses_the_next(
        client: Client, stack_db: redis.Redis, provider: StandInProvider) -> None:
    account, app, ref = _limit(stack_db, client, tokens_per_day=3), _ref("app"), _ref("asks")
    response = client.request("PUT", f"/api/v1/applications/{app}",
                              json={"intents": {"answer": {"model": "echo", "base_url": provider.base_url}}})
    assert response.status_code in (200, 201), response.text
    client.upload(ref, ASKS.format(app=app))

    first = client.invoke(ref)  # under the budget when it starts, over it by its end: it finishes
    assert first.status_code == 200, first.text
    used = first.json()["output"]["total_tokens"]
    assert used > 3
    today = stack_db.hgetall(keys.account_usage(account, day_of(time.time())))
    assert int(today[b"tokens"]) == used and int(today[b"model_tokens:echo"]) == used
    assert int(today[f"wf:{ref}:tokens".encode()]) == used

    response = _refused_and_nothing_queued(client, stack_db, account, ref, "tokens_per_day",
                                           f"{used} of 3 tokens today")
    assert abs(int(response.headers["Retry-After"]) - seconds_to_midnight()) <= 5


def test_the_compute_budget_refuses_new_runs_once_spent(client: Client, stack_db: redis.Redis) -> None:
    account, ref = _limit(stack_db, client, compute_seconds_per_day=1), _ref("slow")
    client.upload(ref, SLOW)
    assert client.invoke(ref, input={"seconds": 1.2}).status_code == 200

    response = _refused_and_nothing_queued(client, stack_db, account, ref, "compute_seconds_per_day",
                                           "of 1 compute seconds today")
    assert abs(int(response.headers["Retry-After"]) - seconds_to_midnight()) <= 5
    today = stack_db.hgetall(keys.account_usage(account, day_of(time.time())))
    assert int(today[b"compute_ms"]) >= 1200 and int(today[b"runs:succeeded"]) == 1


@pytest.mark.parametrize("body, upload, status", [
    ({"seconds": 0}, {}, 200),                    # success
    ({"fail": True}, {}, 500),                    # the script raises
    ({"seconds": 5}, {"timeout_seconds": 1}, 408),  # the soft time limit
])
def test_the_concurrency_slot_comes_back_after_each_end(client: Client, stack_db: redis.Redis,
                                                        body: dict[str, Any], upload: dict[str, Any],
                                                        status: int) -> None:
    account, ref = _limit(stack_db, client, concurrency=1), _ref("ends")
    client.upload(ref, SLOW, **upload)

    response = client.invoke(ref, input=body)

    assert response.status_code == status, response.text
    assert stack_db.zcard(keys.account_slots(account)) == 0
    assert stack_db.zscore(keys.ACTIVE_ACCOUNTS, account) is None
    assert client.invoke(ref, input={"seconds": 0}).status_code == 200


@contextmanager
def _doomed_stack(name: str, timeout_seconds: int) -> Iterator[tuple[Stack, Any, Client, redis.Redis, str, str]]:
    """A stack of its own whose one worker ("flowpool@doomed") a test kills, a concurrency-1 account on it and its
    slow workflow: (stack, the worker's process, the client, a Redis client, the account id, the workflow's ref)."""
    stack = Stack(env={**TEST_ENV, "FLOWPOOL_QUEUE_WAIT_SECONDS": "30"})
    db = None
    try:
        doomed = stack.start_worker("--concurrency", "2", "--name", "flowpool@doomed", quiet=True)
        stack.start_api(quiet=True)
        stack.wait_ready()
        assert stack.api_url is not None
        client = Client(stack.api_url, stack.create_account(name))
        db = redis.Redis.from_url(stack.redis_url)
        account, ref = _limit(db, client, concurrency=1), _ref("slow")
        client.upload(ref, SLOW, timeout_seconds=timeout_seconds)
        yield stack, doomed, client, db, account, ref
    finally:
        if db is not None:
            db.close()
        stack.stop(timeout=20)


def test_the_concurrency_slot_comes_back_when_the_worker_running_it_is_killed() -> None:
    with _doomed_stack("killed", timeout_seconds=30) as (stack, doomed, client, db, account, ref):
        answers: list[requests.Response] = []
        thread = threading.Thread(target=lambda: answers.append(client.invoke(ref, input={"seconds": 25})),
                                  daemon=True)
        thread.start()
        eventually(lambda: _running(client, db, account), 20, "the run started")
        _check_refused(client.invoke(ref, input={"seconds": 0}), "concurrency")

        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        stack.processes.remove(doomed)
        thread.join(30)  # its caller sees the lease lapse and ends the run as lost

        assert answers and answers[0].status_code == 500 and error_of(answers[0])["type"] == "worker_lost"
        assert db.zcard(keys.account_slots(account)) == 0
        stack.start_worker("--concurrency", "2", "--name", "flowpool@survivor", quiet=True)
        stack.wait_ready(names=["flowpool@survivor"])  # not the killed worker's last heartbeat, still in its TTL
        assert client.invoke(ref, input={"seconds": 0}).status_code == 200


def test_a_killed_workers_slot_lapses_with_its_lease_when_nobody_waits_on_its_run() -> None:
    """An async run (nobody waits on it) whose worker is SIGKILLed: no waiter ends it, and the reaper would only
    past its hard limit; its slot lapses with its lease, which no heartbeat renews any more."""
    with _doomed_stack("killed-async", timeout_seconds=60) as (stack, doomed, client, db, account, ref):
        started = client.post("/api/v1/runs", json={"model": f"workflow:{ref}", "input": {"seconds": 50}})
        assert started.status_code == 202, started.text
        first = started.json()["request_id"]
        eventually(lambda: _running(client, db, account), 20, "the run started")
        _check_refused(client.invoke(ref, input={"seconds": 0}), "concurrency")

        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        stack.processes.remove(doomed)
        stack.start_worker("--concurrency", "2", "--name", "flowpool@survivor", quiet=True)
        # The killed worker's last heartbeat counts as a live worker for its TTL: a plain wait_ready could return
        # on it, and the invoke below find no worker serving the queue once it lapsed (503) if the survivor has
        # not beaten yet.
        stack.wait_ready(names=["flowpool@survivor"])

        # Within the killed worker's lease (FLOWPOOL_WORKER_TTL_SECONDS, 2 s), not its run's deadline (a minute).
        deadline = time.monotonic() + 15
        while (response := client.invoke(ref, input={"seconds": 0})).status_code == 429:
            assert time.monotonic() < deadline, response.text
            time.sleep(0.5)
        assert response.status_code == 200, response.text
        assert _status(client, first) == "running"  # nobody ended it: its slot lapsed by itself


def test_the_concurrency_slot_comes_back_when_a_streaming_caller_goes_away_and_cancels(
        client: Client, stack_db: redis.Redis) -> None:
    account, ref = _limit(stack_db, client, concurrency=1), _ref("cancels")
    client.upload(ref, EMITS_THEN_SLEEPS, timeout_seconds=60)
    with client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {"seconds": 50},
                                                         "stream": True, "on_disconnect": "cancel"},
                     stream=True, timeout=30) as r:
        request_id = r.headers["X-Request-Id"]
        next(sse_events(r, comments=True))
        _check_refused(client.invoke(ref, input={"seconds": 0}), "concurrency")

    eventually(lambda: _status(client, request_id) == "cancelled", 20, "the run was cancelled")
    assert stack_db.zcard(keys.account_slots(account)) == 0
    assert client.invoke(ref, input={"seconds": 0}).status_code == 200


def test_limits_hold_across_two_api_processes(client: Client, stack_db: redis.Redis,
                                              redis_server: RedisServer) -> None:
    account, ref = _limit(stack_db, client, concurrency=1, rpm=3), _ref("slow")
    client.upload(ref, SLOW)
    with second_api(redis_server) as other:
        assert other.api_url is not None
        elsewhere = Client(other.api_url, client.key)
        with _holding(client, stack_db, account, ref):
            _check_refused(elsewhere.invoke(ref, input={"seconds": 0}), "concurrency")
        # Two requests of the burst of 3 spent on the first API (the holding run, and the refused one which took
        # none); the next on the second, the one after that refused by either.
        assert elsewhere.invoke(ref, input={"seconds": 0}).status_code == 200
        assert client.invoke(ref, input={"seconds": 0}).status_code == 200
        _check_refused(elsewhere.invoke(ref, input={"seconds": 0}), "rpm")
        _check_refused(client.invoke(ref, input={"seconds": 0}), "rpm")


def test_a_nested_call_runs_inside_its_callers_slot(client: Client, stack_db: redis.Redis) -> None:
    account = _limit(stack_db, client, concurrency=1)
    inner, outer = _ref("upper"), _ref("router")
    client.upload(inner, """
        def execute(ctx):
            return {"upper": ctx.input["text"].upper()}
    """)
    client.upload(outer, f"""
        def execute(ctx):
            return ctx.workflows.call("{inner}", input={{"text": ctx.input["text"]}})
    """)

    response = client.invoke(outer, input={"text": "hi"})

    assert response.status_code == 200, response.text
    assert response.json()["output"] == {"upper": "HI"}
    today = stack_db.hgetall(keys.account_usage(account, day_of(time.time())))
    assert int(today[b"runs:succeeded"]) == 1  # one run: the call is part of it
