"""Webhook delivery against a real Redis and a receiver on loopback: claims, signatures, retries, the egress guard.

The deliverer runs in the test's thread (``deliver_due``); the worker's
threads are the integration tests' (tests/integration/test_async_runs.py).
"""
from __future__ import annotations

import json
import socket
import time
from typing import Iterator

import pytest
import redis

from flowpool import keys
from flowpool.egress import EgressDenied, EgressPolicy
from flowpool.registry import Accounts
from flowpool.run import RunRecord, RunStatus
from flowpool.runs import RunStore
from flowpool.settings import Settings
from flowpool.signing import verify
from flowpool.tasks.webhooks import WebhookDeliverer, _refused_or_retried
from flowpool.webhooks import MAX_BACKOFF_SECONDS, WebhookStore, next_attempt_at
from tests.webhook_receiver import WebhookReceiver

LOOPBACK = EgressPolicy("127.0.0.1/32")


@pytest.fixture
def store(redis_db: redis.Redis) -> WebhookStore:
    return WebhookStore(redis_db, ttl_seconds=3600)


@pytest.fixture
def runs(redis_db: redis.Redis) -> RunStore:
    return RunStore(redis_db, ttl_seconds=3600, runs_per_workflow=100)


@pytest.fixture
def account(redis_db: redis.Redis) -> str:
    return Accounts(redis_db).create("hooks")[0].id


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def _deliverer(redis_db: redis.Redis, store: WebhookStore, runs: RunStore, policy: EgressPolicy = LOOPBACK,
               retry_seconds: float = 60) -> WebhookDeliverer:
    settings = Settings(webhook_retry_seconds=retry_seconds, webhook_timeout_seconds=5)
    return WebhookDeliverer(store, runs, Accounts(redis_db), settings, policy)


def _ended(runs: RunStore, account: str, request_id: str, status: RunStatus = RunStatus.SUCCEEDED) -> None:
    """A run record as its worker leaves it at its end."""
    now = time.time()
    runs.record(RunRecord(request_id=request_id, account=account, workflow="greet", status=status, version="1.0.0",
                          session_id="sess_1", queued_at=now - 2, started_at=now - 1, finished_at=now,
                          output={"greeting": "hi"}, usage={"total_tokens": 3},
                          error=None if status == RunStatus.SUCCEEDED else {"type": "script_error"}))


def _due(store: WebhookStore, account: str, request_id: str, url: str) -> None:
    store.prepare(request_id, account, url)
    store.due_now(request_id)


# The backoff.

def test_retries_wait_one_two_four_seconds_doubling_up_to_five_minutes_never_sooner() -> None:
    waits = [next_attempt_at(tries, 0.0, 0.0, 1e9, jitter=0.0) for tries in range(1, 13)]

    assert waits[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert max(waits) == MAX_BACKOFF_SECONDS
    assert next_attempt_at(3, 0.0, 0.0, 1e9, jitter=0.999) == pytest.approx(5.0, abs=0.01)  # a quarter more at most


def test_retries_stop_at_the_window_with_one_last_attempt_at_its_end() -> None:
    assert next_attempt_at(6, first_at=100.0, now=150.0, retry_seconds=60, jitter=0.0) == 160.0  # not 182
    assert next_attempt_at(7, first_at=100.0, now=160.0, retry_seconds=60, jitter=0.0) is None


def test_a_name_that_did_not_resolve_is_tried_again_and_a_refused_address_is_not() -> None:
    unresolved = EgressDenied("cannot resolve hooks.example: no address")
    unresolved.__cause__ = socket.gaierror(-2, "Name or service not known")

    assert _refused_or_retried(unresolved) == "pending"
    assert _refused_or_retried(EgressDenied("127.0.0.2 resolves to 127.0.0.2, a loopback address")) == "refused"


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/hook", "http://127.0.0.1:abc/hook", "http://[::1/hook"])
def test_a_url_that_does_not_parse_is_refused_by_the_egress_guard_not_raised_as_a_crash(url: str) -> None:
    with pytest.raises(EgressDenied, match="not a URL that can be reached"):
        LOOPBACK.check_url(url)


# Claims.

def test_a_claim_leases_the_webhook_so_no_other_deliverer_takes_it_until_the_lease_lapses(
        store: WebhookStore, account: str) -> None:
    _due(store, account, "req_a", "http://127.0.0.1:9/hook")
    now = time.time()

    assert store.claim(30, limit=10, now=now) == ["req_a"]
    assert store.claim(30, limit=10, now=now + 1) == []  # leased
    assert store.claim(30, limit=10, now=now + 31) == ["req_a"]  # its deliverer died holding it


def test_a_claim_takes_one_webhook_of_each_account_not_the_oldest_of_one_accounts_flood(
        redis_db: redis.Redis, store: WebhookStore) -> None:
    accounts = Accounts(redis_db)
    flood, other = accounts.create("flood")[0].id, accounts.create("other")[0].id
    now = time.time()
    for n in range(50):  # all older than the other account's one
        store.prepare(f"req_flood_{n}", flood, "http://127.0.0.1:9/hook")
        redis_db.zadd(keys.WEBHOOKS_DUE, {f"req_flood_{n}": now - 100 + n})
    _due(store, other, "req_other", "http://127.0.0.1:9/hook")

    assert sorted(store.claim(30, limit=10, now=now + 1)) == ["req_flood_0", "req_other"]
    # One at a time, the accounts take turns: the other account's next one comes before the flood's third.
    _due(store, other, "req_other_2", "http://127.0.0.1:9/hook")
    turns = [store.claim(30, limit=1, now=now + 2) for _ in range(4)]
    assert sorted(sum(turns, [])) == ["req_flood_1", "req_flood_2", "req_flood_3", "req_other_2"]
    assert "req_other_2" in turns[0] + turns[1]


def test_one_accounts_webhooks_to_a_tarpit_do_not_hold_another_accounts_delivery(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, receiver: WebhookReceiver) -> None:
    """A receiver that never answers (a listening socket nobody accepts from) holds each delivery till its
    timeout; oldest first, the flood's 20 would hold both threads for ~20 s before the other account's turn."""
    accounts = Accounts(redis_db)
    flood, other = accounts.create("tarpitted")[0].id, accounts.create("patient")[0].id
    with socket.socket() as tarpit:
        tarpit.bind(("127.0.0.1", 0))
        tarpit.listen(64)
        tarpit_url = f"http://127.0.0.1:{tarpit.getsockname()[1]}/hook"
        for n in range(20):
            _ended(runs, flood, f"req_slow_{n}")
            _due(store, flood, f"req_slow_{n}", tarpit_url)
        _ended(runs, other, "req_patient")
        _due(store, other, "req_patient", receiver.url)
        settings = Settings(webhook_retry_seconds=60, webhook_timeout_seconds=2)
        deliverer = WebhookDeliverer(store, runs, accounts, settings, LOOPBACK, threads=2, poll_seconds=0.05)
        deliverer.start()
        try:
            [delivery] = receiver.wait_for(1, timeout=8)
        finally:
            deliverer.stop()
    assert delivery.headers["X-Flowpool-Webhook-Id"] == "req_patient"


# Deliveries.

def test_a_delivery_posts_the_runs_end_signed_with_the_accounts_secret(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, account: str, receiver: WebhookReceiver) -> None:
    _ended(runs, account, "req_ok")
    _due(store, account, "req_ok", receiver.url)

    assert _deliverer(redis_db, store, runs).deliver_due() == 1

    [delivery] = receiver.wait_for(1)
    secret = Accounts(redis_db).webhook_secret(account)
    verify(delivery.body, delivery.headers["X-Flowpool-Signature"], secret)
    assert delivery.headers["Content-Type"] == "application/json"
    assert delivery.headers["X-Flowpool-Webhook-Id"] == "req_ok"
    payload = json.loads(delivery.body)
    assert payload == {"type": "run.completed", "request_id": "req_ok", "workflow": "greet", "version": "1.0.0",
                       "status": "succeeded", "session_id": "sess_1", "output": {"greeting": "hi"}, "error": None,
                       "usage": {"total_tokens": 3}, "finished_at": payload["finished_at"]}
    view = store.view("req_ok")
    assert view is not None and view["status"] == "delivered" and view["next_attempt_at"] is None
    [attempt] = view["attempts"]
    assert attempt["status_code"] == 200 and attempt["ms"] >= 0 and abs(attempt["at"] - time.time()) < 30
    assert redis_db.zcard(keys.WEBHOOKS_DUE) == 0
    assert _deliverer(redis_db, store, runs).deliver_due() == 0  # delivered once


def test_a_failing_receiver_gets_the_webhook_again_with_backoff_until_it_answers(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, account: str) -> None:
    deliverer = _deliverer(redis_db, store, runs)
    with WebhookReceiver(statuses=(500, 503, 200)) as receiver:
        _ended(runs, account, "req_retry", RunStatus.FAILED)
        _due(store, account, "req_retry", receiver.url)

        deliverer.deliver_due()
        view = store.view("req_retry")
        assert view is not None and view["status"] == "pending"
        assert [a["status_code"] for a in view["attempts"]] == [500]
        assert 1.0 <= view["next_attempt_at"] - view["attempts"][0]["at"] <= 1.5
        assert deliverer.deliver_due() == 0  # not due before its time

        for _ in range(2):
            wait = store.get("req_retry").next_at - time.time()  # type: ignore[union-attr]
            time.sleep(max(0.0, wait) + 0.05)
            assert deliverer.deliver_due() == 1

        deliveries = receiver.wait_for(3)
    view = store.view("req_retry")
    assert view is not None and view["status"] == "delivered"
    assert [a["status_code"] for a in view["attempts"]] == [500, 503, 200]
    assert len({d.headers["X-Flowpool-Signature"] for d in deliveries}) >= 2  # signed afresh for each attempt
    assert json.loads(deliveries[2].body)["status"] == "failed"


def test_a_webhook_still_failing_at_the_end_of_its_window_is_failed(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, account: str) -> None:
    deliverer = _deliverer(redis_db, store, runs, retry_seconds=0.5)
    with WebhookReceiver(statuses=(500,)) as receiver:
        _ended(runs, account, "req_fail")
        _due(store, account, "req_fail", receiver.url)
        deliverer.deliver_due()
        time.sleep(0.6)  # past the window: the next attempt, at its end, is the last
        assert deliverer.deliver_due() == 1

    view = store.view("req_fail")
    assert view is not None and view["status"] == "failed"
    assert [a["status_code"] for a in view["attempts"]] == [500, 500]
    assert redis_db.zcard(keys.WEBHOOKS_DUE) == 0


def test_attempts_and_logs_name_the_receivers_origin_never_its_path_which_may_hold_a_token(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, account: str,
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/services/T0000/B0000/sEcReTtOkEn?token=qUeRySeCrEt"
    _ended(runs, account, "req_token")
    _due(store, account, "req_token", url)

    with caplog.at_level("INFO", logger="flowpool.webhooks"):
        _deliverer(redis_db, store, runs).deliver_due()

    webhook = store.get("req_token")
    assert webhook is not None and webhook.status == "pending"
    recorded = json.dumps(webhook.attempts) + caplog.text
    assert "sEcReTtOkEn" not in recorded and "qUeRySeCrEt" not in recorded and "/services" not in recorded
    assert webhook.attempts[0]["error"] == "ConnectionError: Connection refused"
    assert f"http://127.0.0.1:{port}:" in caplog.text or f"http://127.0.0.1:{port} " in caplog.text


def test_a_redirect_is_not_followed_and_counts_as_a_failure(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, account: str) -> None:
    with WebhookReceiver(statuses=(302,)) as receiver:
        _ended(runs, account, "req_moved")
        _due(store, account, "req_moved", receiver.url)
        _deliverer(redis_db, store, runs).deliver_due()

        assert [d.path for d in receiver.deliveries] == ["/hook"]  # /moved never asked for
    view = store.view("req_moved")
    assert view is not None and view["status"] == "pending" and view["attempts"][0]["status_code"] == 302


def test_an_address_the_egress_guard_refuses_is_refused_at_delivery_never_connected_nor_retried(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, account: str, receiver: WebhookReceiver) -> None:
    # The receiver listens on loopback, which a policy allowing nothing refuses.
    _ended(runs, account, "req_refused")
    _due(store, account, "req_refused", receiver.url)

    assert _deliverer(redis_db, store, runs, policy=EgressPolicy("")).deliver_due() == 1

    view = store.view("req_refused")
    assert view is not None and view["status"] == "refused"
    [attempt] = view["attempts"]
    assert "loopback" in attempt["error"] and "FLOWPOOL_EGRESS_ALLOW" in attempt["error"]
    assert receiver.deliveries == []
    assert redis_db.zcard(keys.WEBHOOKS_DUE) == 0


def test_a_webhook_whose_run_has_not_ended_waits_without_an_attempt(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, account: str, receiver: WebhookReceiver) -> None:
    runs.record(RunRecord(request_id="req_going", account=account, workflow="greet", status=RunStatus.RUNNING,
                          queued_at=time.time()))
    _due(store, account, "req_going", receiver.url)

    _deliverer(redis_db, store, runs).deliver_due()

    webhook = store.get("req_going")
    assert webhook is not None and webhook.status == "pending" and webhook.attempts == []
    assert redis_db.zscore(keys.WEBHOOKS_DUE, "req_going") > time.time()
    assert receiver.deliveries == []


def test_a_webhook_whose_run_record_is_gone_fails_saying_so_and_one_gone_itself_leaves_the_due_set(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, account: str, receiver: WebhookReceiver) -> None:
    _due(store, account, "req_no_record", receiver.url)
    store.due_now("req_no_hook")  # its hash expired

    assert _deliverer(redis_db, store, runs).deliver_due() == 2

    view = store.view("req_no_record")
    assert view is not None and view["status"] == "failed" and "record is gone" in view["attempts"][0]["error"]
    assert store.view("req_no_hook") is None
    assert redis_db.zcard(keys.WEBHOOKS_DUE) == 0 and receiver.deliveries == []


def test_an_outcome_recorded_twice_counts_once(store: WebhookStore, account: str) -> None:
    _due(store, account, "req_twice", "http://127.0.0.1:9/hook")

    assert store.record("req_twice", {"at": 1.0, "status_code": 200, "ms": 1.0}, "delivered") is True
    assert store.record("req_twice", {"at": 2.0, "status_code": 200, "ms": 1.0}, "delivered") is False
    assert len(store.view("req_twice")["attempts"]) == 1  # type: ignore[index]


def test_the_worker_thread_delivers_what_comes_due(
        redis_db: redis.Redis, store: WebhookStore, runs: RunStore, account: str, receiver: WebhookReceiver) -> None:
    deliverer = _deliverer(redis_db, store, runs)
    deliverer.start()
    try:
        _ended(runs, account, "req_thread")
        _due(store, account, "req_thread", receiver.url)
        receiver.wait_for(1, timeout=10)
    finally:
        deliverer.stop()
    webhook = store.get("req_thread")
    assert webhook is not None and webhook.status == "delivered"
