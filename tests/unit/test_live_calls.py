"""A running run's live calls: what its worker pushes (LiveCalls, on a real Redis) and how readers merge it."""
from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from flowpool import keys
from flowpool.live_calls import MAX_LIVE_BYTES, MAX_LIVE_CALLS, LiveCalls, merge, with_live_calls
from flowpool.run import RunRecord, secret_redactions
from flowpool.tasks.outbound import MAX_RECORDED_HTTP_BYTES, MAX_RECORDED_HTTP_CALLS

T0 = 1_700_000_000.0
SECRET = "sk-unit-secret"


def _entry(call_id: str, kind: str, call: dict[str, Any] | None) -> bytes:
    return json.dumps({"id": call_id, "list": kind, "call": call}).encode()


def _live(client: redis.Redis, request_id: str = "req_live") -> LiveCalls:
    return LiveCalls(client, request_id, secret_redactions([SECRET]), until=time.monotonic() + 60, tail_ms=300_000)


@pytest.fixture
def unreachable() -> Iterator[redis.Redis]:
    """A client of a loopback port bound but not listening (connecting is refused), tried once per command."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    client = redis.Redis(port=sock.getsockname()[1], socket_connect_timeout=1, socket_timeout=1,
                         retry=Retry(NoBackoff(), 0))
    try:
        yield client
    finally:
        client.close()
        sock.close()


def test_merge_keeps_each_calls_latest_entry_in_the_order_the_calls_started() -> None:
    merged = merge([
        _entry("1", "model", {"model": "a", "status": "running", "started_at": T0}),
        _entry("2", "workflow", {"workflow": "child", "status": "running", "started_at": T0 + 1}),
        _entry("3", "http", {"path": "/x", "status": "ok", "started_at": T0 + 2}),
        _entry("1", "model", {"model": "a", "status": "ok", "started_at": T0, "latency_ms": 5.0}),
        _entry("4", "model", {"model": "b", "status": "running", "started_at": T0 + 3}),
    ])

    assert merged["model_calls"] == [
        {"model": "a", "status": "ok", "started_at": T0, "latency_ms": 5.0, "call_id": "1"},
        {"model": "b", "status": "running", "started_at": T0 + 3, "call_id": "4"}]
    assert merged["workflow_calls"] == [{"workflow": "child", "status": "running", "started_at": T0 + 1,
                                         "call_id": "2"}]
    assert merged["http_calls"] == [{"path": "/x", "status": "ok", "started_at": T0 + 2, "call_id": "3"}]


def test_merge_leaves_out_calls_taken_back_and_entries_it_cannot_read() -> None:
    merged = merge([_entry("1", "model", {"model": "a", "status": "running"}), _entry("1", "model", None),
                    b"not json", b"[1, 2]", _entry("2", "elsewhere", {"status": "ok"}), _entry("3", "http", "text")])

    assert merged == {"model_calls": [], "http_calls": [], "workflow_calls": []}


def test_a_call_is_pushed_when_it_starts_and_when_it_ends_under_one_id(redis_db: redis.Redis) -> None:
    live = _live(redis_db)
    record: dict[str, Any] = {"kind": "model", "model": "m", "started_at": T0, "attempts": 0}
    live.start("model", record)
    started = merge(redis_db.lrange(keys.run_calls("req_live"), 0, -1))["model_calls"]
    assert started == [{"kind": "model", "model": "m", "started_at": T0, "attempts": 0, "status": "running",
                        "call_id": "1"}]
    record.update(status="ok", latency_ms=12.5, attempts=1)
    live.end("model", record)
    live.end("http", {"kind": "http", "path": "/p", "status": "ok"})  # published at its end only

    entries = redis_db.lrange(keys.run_calls("req_live"), 0, -1)
    assert len(entries) == 3
    merged = merge(entries)
    assert merged["model_calls"] == [{**record, "call_id": "1"}]
    assert merged["http_calls"] == [{"kind": "http", "path": "/p", "status": "ok", "call_id": "2"}]
    # While the run goes the list lives past its deadline; the end's pipeline leaves it the few minutes.
    assert redis_db.pttl(keys.run_calls("req_live")) > 300_000
    pipe = redis_db.pipeline()
    live.expire_at_end(pipe)
    pipe.execute()
    assert 0 < redis_db.pttl(keys.run_calls("req_live")) <= 300_000


def test_a_workflow_calls_end_is_matched_to_its_start_and_kept_without_its_logs(redis_db: redis.Redis) -> None:
    live = _live(redis_db)
    shown = {"workflow": "child", "started_at": T0, "latency_ms": None}
    live.start("workflow", shown)
    live.end("workflow", {"workflow": "child", "status": "ok", "started_at": T0, "latency_ms": 3.0,
                          "logs": [{"msg": "x" * 1000}]}, started=shown)

    [call] = merge(redis_db.lrange(keys.run_calls("req_live"), 0, -1))["workflow_calls"]
    assert call == {"workflow": "child", "status": "ok", "started_at": T0, "latency_ms": 3.0, "call_id": "1"}


def test_a_started_call_the_record_will_not_keep_is_taken_back(redis_db: redis.Redis) -> None:
    live = _live(redis_db)
    record = {"kind": "model", "model": "m"}
    live.start("model", record)
    live.drop(record)

    assert merge(redis_db.lrange(keys.run_calls("req_live"), 0, -1))["model_calls"] == []


def test_the_runs_secrets_are_redacted_from_what_is_pushed(redis_db: redis.Redis) -> None:
    live = _live(redis_db)
    live.end("http", {"kind": "http", "path": f"/doc/{SECRET}", "error": f"no {SECRET}", SECRET: 1})

    raw = b"".join(redis_db.lrange(keys.run_calls("req_live"), 0, -1))
    assert SECRET.encode() not in raw and b"/doc/[redacted]" in raw


def test_past_the_records_caps_calls_are_not_shown_live(redis_db: redis.Redis) -> None:
    assert (MAX_LIVE_CALLS, MAX_LIVE_BYTES) == (MAX_RECORDED_HTTP_CALLS, MAX_RECORDED_HTTP_BYTES)
    live = _live(redis_db)
    for n in range(MAX_LIVE_CALLS + 5):
        live.end("http", {"kind": "http", "path": f"/{n}", "status": "ok"})
    record = {"kind": "model", "model": "m"}
    live.start("model", record)  # another list's cap is its own

    merged = merge(redis_db.lrange(keys.run_calls("req_live"), 0, -1))
    assert len(merged["http_calls"]) == MAX_LIVE_CALLS and len(merged["model_calls"]) == 1


def test_an_unreachable_redis_fails_no_call_and_is_logged_once(unreachable: redis.Redis,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    live = _live(unreachable)
    record = {"kind": "model", "model": "m"}
    with caplog.at_level(logging.WARNING, logger="flowpool.worker"):
        live.start("model", record)
        record["status"] = "ok"
        live.end("model", record)  # within the pause after the failure: not tried, kept for the next write
        live.end("http", {"kind": "http", "status": "ok"})

    warnings = [r for r in caplog.records if "not shown live" in r.getMessage()]
    assert len(warnings) == 1 and "req_live" in warnings[0].getMessage()


def test_entries_redis_did_not_take_go_out_with_the_next_write(redis_db: redis.Redis,
                                                               unreachable: redis.Redis) -> None:
    live = _live(unreachable)
    record = {"kind": "model", "model": "m"}
    live.start("model", record)
    live.client = redis_db  # Redis answers again, and the pause is over
    live._next_try = 0.0
    record["status"] = "ok"
    live.end("model", record)

    assert merge(redis_db.lrange(keys.run_calls("req_live"), 0, -1))["model_calls"] == [
        {"kind": "model", "model": "m", "status": "ok", "call_id": "1"}]
    assert redis_db.pttl(keys.run_calls("req_live")) > 0


def test_a_running_runs_record_gets_its_live_calls_and_an_ended_one_keeps_its_own(redis_db: redis.Redis) -> None:
    live = _live(redis_db)
    live.start("model", {"kind": "model", "model": "held"})
    running = RunRecord(request_id="req_live", account="acct", workflow="flow", status="running")
    ended = RunRecord(request_id="req_live", account="acct", workflow="flow", status="succeeded",
                      model_calls=[{"kind": "model", "model": "kept", "status": "ok"}])

    assert with_live_calls(redis_db, running).model_calls == [
        {"kind": "model", "model": "held", "status": "running", "call_id": "1"}]
    assert with_live_calls(redis_db, ended) is ended

