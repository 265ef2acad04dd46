"""A running run's log lines in its stream, against a real Redis: written once, in order with its chunks, read only
by those who ask, and gone with the record."""
from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from flowpool import keys
from flowpool.run import RunEnd, RunRecord, RunStatus
from flowpool.runs import LOG_CUT, RunStore

TTL_SECONDS = 60


@pytest.fixture
def runs(redis_db: redis.Redis) -> RunStore:
    return RunStore(redis_db, ttl_seconds=TTL_SECONDS, runs_per_workflow=3)


def _running(runs: RunStore, request_id: str) -> str:
    """A run queued and claimed, as a worker holds it; the claim's token."""
    pipe = runs.redis.pipeline()
    runs.create(pipe, RunRecord(request_id=request_id, account="acct-1", workflow="summarize",
                                status=RunStatus.QUEUED, version="1.0.0", queued_at=time.time()))
    pipe.execute()
    assert runs.claim(request_id, "worker-a", lease_ms=10_000, hard_seconds=30, token="delivery-1")
    return "delivery-1"


def _finish(runs: RunStore, request_id: str, logs: list[dict[str, Any]]) -> None:
    pipe = runs.redis.pipeline()
    runs.finish(pipe, request_id, RunEnd(status="succeeded", version="1.0.0", output="ok"),
                {"output": "ok", "logs": logs, "logs_truncated": False}, claim="delivery-1")
    pipe.execute()


def _line(msg: str, **fields: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"level": "info", "msg": msg, "time": 1700000000.5}
    if fields:
        line["fields"] = fields
    return line


def _entries(redis_db: redis.Redis, request_id: str) -> list[tuple[str, Any]]:
    return [(fields[b"kind"].decode(), json.loads(fields[b"data"]))
            for _, fields in redis_db.xrange(keys.run_events(request_id))]


def test_a_mixed_batch_written_again_after_a_lost_answer_adds_nothing_twice_and_keeps_the_order(
        runs: RunStore, redis_db: redis.Redis) -> None:
    _running(runs, "req_1")
    batch = [("log", 0, _line("start")), ("chunk", 0, {"type": "step", "content": "a"}), ("log", 1, _line("mid"))]
    runs.add_events("req_1", batch)
    runs.add_events("req_1", batch)  # Redis ran the first write; its answer was lost
    # Written again with what came meanwhile: only the new ones are added.
    grown = [*batch, ("chunk", 1, {"type": "step", "content": "b"}), ("log", 2, _line("end", n=1))]
    runs.add_events("req_1", grown)
    runs.add_events("req_1", grown)
    runs.add_events("req_1", grown[-2:])  # the part past the last full write: all there

    assert _entries(redis_db, "req_1") == [
        ("log", {**_line("start"), "index": 0}), ("chunk", {"type": "step", "content": "a", "index": 0}),
        ("log", {**_line("mid"), "index": 1}), ("chunk", {"type": "step", "content": "b", "index": 1}),
        ("log", {**_line("end", n=1), "index": 2})]


def test_chunks_numbered_on_after_log_lines_are_appended_and_a_run_that_ended_takes_none(
        runs: RunStore, redis_db: redis.Redis) -> None:
    _running(runs, "req_1")
    runs.add_chunks("req_1", [("step", "a", 0)])
    runs.add_events("req_1", [("log", 0, _line("between"))])
    runs.add_chunks("req_1", [("step", "b", 1)])  # the stream's last entry is a log line: still taken
    _finish(runs, "req_1", [_line("between")])
    runs.add_events("req_1", [("log", 1, _line("late"))])

    assert [kind for kind, _ in _entries(redis_db, "req_1")] == ["chunk", "log", "chunk", "done"]
    assert runs.chunks("req_1") == [{"type": "step", "content": "a"}, {"type": "step", "content": "b"}]


def test_readers_pass_over_log_lines_unless_they_ask_for_them(runs: RunStore) -> None:
    _running(runs, "req_1")
    runs.add_events("req_1", [("log", 0, _line("first")), ("chunk", 0, {"type": "step", "content": "a"}),
                              ("log", 1, _line("second"))])
    _finish(runs, "req_1", [_line("first"), _line("second")])

    plain = list(runs.events("req_1", queue_wait=1, run_seconds=1, poll=0.05))
    assert [kind for _, kind, _ in plain] == ["chunk", "done"]
    assert [kind for _, kind, _ in runs.events("req_1", 1, 1, poll=0.05, chunks=False)] == ["done"]
    asked = list(runs.events("req_1", queue_wait=1, run_seconds=1, poll=0.05, logs=True))
    assert [kind for _, kind, _ in asked] == ["log", "chunk", "log", "done"]
    assert asked[2][2] == {**_line("second"), "index": 1}
    # Resumed after the first log line's entry id: the rest, in order.
    assert [kind for _, kind, _ in runs.events("req_1", 1, 1, poll=0.05, logs=True, after=asked[0][0])] == [
        "chunk", "log", "done"]
    assert runs.wait("req_1", queue_wait=1, run_seconds=1, poll=0.05).output == "ok"
    assert runs.end_of("req_1") is not None


def test_so_far_gives_a_running_runs_lines_and_chunks_as_kept_and_whether_the_log_was_cut(runs: RunStore) -> None:
    _running(runs, "req_1")
    assert runs.so_far("req_1") == ([], [], False)
    runs.add_events("req_1", [("log", 0, _line("one", k="v")), ("chunk", 0, {"type": "step", "content": 1})])
    assert runs.so_far("req_1") == ([{"type": "step", "content": 1}], [_line("one", k="v")], False)

    cut = {"level": "warning", "msg": "log cut at 100 bytes", "time": 1700000001.0}
    runs.add_events("req_1", [("log", 1, {**cut, LOG_CUT: True})])
    assert runs.so_far("req_1") == ([{"type": "step", "content": 1}], [_line("one", k="v"), cut], True)


def test_the_stream_of_a_running_run_expires_with_the_record_even_if_no_end_is_ever_written(
        runs: RunStore, redis_db: redis.Redis) -> None:
    _running(runs, "req_1")
    runs.add_events("req_1", [("log", 0, _line("only"))])
    assert 0 < redis_db.pttl(keys.run_events("req_1")) <= TTL_SECONDS * 1000
