"""A running run's log lines in a stream of their own, against a real Redis: written once whatever order the writes
land in, read in order with the chunks only by those who ask, copied into the record of a run that was lost, and
gone soon after the end."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis

from flowpool import keys
from flowpool.errors import WorkerLost
from flowpool.run import RunEnd, RunRecord, RunStatus
from flowpool.runs import LOG_TAIL_SECONDS, RunStore

TTL_SECONDS = 600

Chunk = tuple[str, Any, int]
Line = tuple[int, int, dict[str, Any], bool]


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


def _chunk(content: Any, index: int) -> Chunk:
    return ("step", content, index)


def _logged(index: int, after: int, msg: str, cut: bool = False) -> Line:
    return (index, after, _line(msg), cut)


def _chunks_stored(redis_db: redis.Redis, request_id: str) -> list[tuple[str, Any]]:
    return [(fields[b"kind"].decode(), json.loads(fields[b"data"]).get("content"))
            for _, fields in redis_db.xrange(keys.run_events(request_id))]


def _lines_stored(redis_db: redis.Redis, request_id: str) -> list[str]:
    return [json.loads(fields[b"data"])["msg"] for _, fields in redis_db.xrange(keys.run_logs(request_id))]


def _followed(runs: RunStore, request_id: str, after: str = "0-0.0-0") -> list[tuple[str, str, Any]]:
    """Everything an opted-in reader gets, as ``(event id, kind, chunk content or line msg)``."""
    return [(event_id, kind, data.get("content") if kind == "chunk" else data.get("msg") if kind == "log" else None)
            for event_id, kind, data in runs.events(request_id, 1, 1, poll=0.05, logs=True, after=after)]


def test_a_batch_written_again_after_a_lost_answer_adds_nothing_twice_and_keeps_the_order(
        runs: RunStore, redis_db: redis.Redis) -> None:
    _running(runs, "req_1")
    chunks, lines = [_chunk("a", 0)], [_logged(0, 0, "start"), _logged(1, 1, "mid")]
    runs.add_output("req_1", chunks, lines)
    runs.add_output("req_1", chunks, lines)  # Redis ran the first write; its answer was lost
    # Written again with what came meanwhile: only the new ones are added.
    grown = [*chunks, _chunk("b", 1)], [*lines, _logged(2, 2, "end")]
    runs.add_output("req_1", *grown)
    runs.add_output("req_1", *grown)
    runs.add_output("req_1", grown[0][-1:], grown[1][-1:])  # the part past the last full write: all there
    _finish(runs, "req_1", [_line("start"), _line("mid"), _line("end")])

    assert _chunks_stored(redis_db, "req_1") == [("chunk", "a"), ("chunk", "b"), ("done", None)]
    assert _lines_stored(redis_db, "req_1") == ["start", "mid", "end"]
    assert [(kind, what) for _, kind, what in _followed(runs, "req_1")] == [
        ("log", "start"), ("chunk", "a"), ("log", "mid"), ("chunk", "b"), ("log", "end"), ("done", None)]


def test_a_stale_shorter_write_landing_after_its_retry_adds_nothing(runs: RunStore, redis_db: redis.Redis) -> None:
    _running(runs, "req_1")
    # The first write timed out but was still on its way; its retry, with what came since, landed first.
    stale = [_chunk("a", 0), _chunk("b", 1)], [_logged(0, 0, "one"), _logged(1, 2, "two")]
    retry = [*stale[0], _chunk("c", 2)], [*stale[1], _logged(2, 3, "three")]
    runs.add_output("req_1", *retry)
    runs.add_output("req_1", *stale)
    runs.add_chunks("req_1", stale[0][:1])  # a chunks-only write, as stale
    runs.add_output("req_1", [], stale[1][:1])  # a lines-only one

    assert _chunks_stored(redis_db, "req_1") == [("chunk", "a"), ("chunk", "b"), ("chunk", "c")]
    assert _lines_stored(redis_db, "req_1") == ["one", "two", "three"]


def test_log_lines_leave_the_events_stream_to_chunks_and_a_run_that_ended_takes_none(
        runs: RunStore, redis_db: redis.Redis) -> None:
    _running(runs, "req_1")
    runs.add_chunks("req_1", [_chunk("a", 0)])
    runs.add_output("req_1", [], [_logged(0, 1, "between")])
    runs.add_chunks("req_1", [_chunk("b", 1)])
    _finish(runs, "req_1", [_line("between")])
    runs.add_output("req_1", [_chunk("late", 2)], [_logged(1, 2, "late")])

    assert _chunks_stored(redis_db, "req_1") == [("chunk", "a"), ("chunk", "b"), ("done", None)]
    assert _lines_stored(redis_db, "req_1") == ["between"]
    assert runs.chunks("req_1") == [{"type": "step", "content": "a"}, {"type": "step", "content": "b"}]


def test_readers_read_log_lines_only_when_they_ask_and_resume_both_cursors(runs: RunStore) -> None:
    _running(runs, "req_1")
    runs.add_output("req_1", [_chunk("a", 0)], [_logged(0, 0, "first"), _logged(1, 1, "second")])
    _finish(runs, "req_1", [_line("first"), _line("second")])

    plain = list(runs.events("req_1", queue_wait=1, run_seconds=1, poll=0.05))
    assert [kind for _, kind, _ in plain] == ["chunk", "done"]
    assert all("." not in event_id for event_id, _, _ in plain)  # a plain reader's ids are the events stream's
    assert [kind for _, kind, _ in runs.events("req_1", 1, 1, poll=0.05, chunks=False)] == ["done"]
    asked = list(runs.events("req_1", queue_wait=1, run_seconds=1, poll=0.05, logs=True))
    assert [kind for _, kind, _ in asked] == ["log", "chunk", "log", "done"]
    assert asked[2][2] == {**_line("second"), "index": 1}
    # Resumed after the first log line's event id: the rest, in order.
    assert [kind for _, kind, _ in runs.events("req_1", 1, 1, poll=0.05, logs=True, after=asked[0][0])] == [
        "chunk", "log", "done"]
    assert runs.wait("req_1", queue_wait=1, run_seconds=1, poll=0.05).output == "ok"


def test_a_long_interleaved_run_is_read_in_order_past_the_read_limit_and_resumed_from_any_event_once(
        runs: RunStore) -> None:
    _running(runs, "req_1")
    # 1,200 lines in bursts between 6 chunks: more lines than one XREAD reads, in writes of mixed sizes.
    sent: list[tuple[str, str]] = []
    chunks: list[Chunk] = []
    lines: list[Line] = []
    written = [0, 0]

    def write() -> None:
        runs.add_output("req_1", chunks[written[0]:], lines[written[1]:])
        written[:] = [len(chunks), len(lines)]

    for n in range(1200):
        if n % 200 == 150:
            chunks.append(_chunk(f"c{len(chunks)}", len(chunks)))
            sent.append(("chunk", str(chunks[-1][1])))
        lines.append(_logged(n, len(chunks), f"l{n}"))
        sent.append(("log", f"l{n}"))
        if n % 97 == 0 or n % 200 == 150:
            write()
    write()
    _finish(runs, "req_1", [])

    followed = _followed(runs, "req_1")
    assert [(kind, what) for _, kind, what in followed] == [*sent, ("done", None)]
    for at in (0, 150, 151, 152, 700, len(followed) - 2):
        assert _followed(runs, "req_1", after=followed[at][0]) == followed[at + 1:]


def test_keepalive_pings_go_on_while_a_run_only_logs(runs: RunStore) -> None:
    _running(runs, "req_1")
    pinged = threading.Event()

    def log_then_end() -> None:
        for n in range(250):  # at most 5 s of a line every 20 ms, till the reader saw its pings
            if pinged.is_set():
                break
            runs.add_output("req_1", [], [_logged(n, 0, f"line {n}")])
            time.sleep(0.02)
        _finish(runs, "req_1", [])

    writer = threading.Thread(target=log_then_end)
    writer.start()
    kinds = []
    try:
        for _, kind, _ in runs.events("req_1", queue_wait=1, run_seconds=30, poll=0.05, keepalive=0.2):
            kinds.append(kind)
            if kinds.count("ping") == 2:
                pinged.set()
    finally:
        pinged.set()
        writer.join(10)
    assert kinds.count("ping") >= 2 and kinds[-1] == "done"


def test_so_far_gives_a_running_runs_lines_and_chunks_as_kept_and_whether_the_log_was_cut(runs: RunStore) -> None:
    _running(runs, "req_1")
    assert runs.so_far("req_1") == ([], [], False)
    runs.add_output("req_1", [("step", 1, 0)], [(0, 0, _line("one", k="v"), False)])
    assert runs.so_far("req_1") == ([{"type": "step", "content": 1}], [_line("one", k="v")], False)

    cut = {"level": "warning", "msg": "log cut at 100 bytes", "time": 1700000001.0}
    runs.add_output("req_1", [], [(1, 1, cut, True)])
    assert runs.so_far("req_1") == ([{"type": "step", "content": 1}], [_line("one", k="v"), cut], True)


def test_a_lost_run_keeps_its_live_lines_in_its_record(runs: RunStore, redis_db: redis.Redis) -> None:
    _running(runs, "req_1")
    cut = {"level": "warning", "msg": "log cut at 100 bytes", "time": 1700000001.0}
    runs.add_output("req_1", [("step", 1, 0)], [(0, 0, _line("one", k="v"), False), (1, 1, cut, True)])
    assert runs.abandon("req_1", RunStatus.RUNNING, WorkerLost("the worker died"), "1.0.0", force=True)

    record = runs.get("req_1")
    assert record is not None and record.status == "lost"
    assert record.logs == [_line("one", k="v"), cut] and record.logs_truncated is True
    runs.add_output("req_1", [], [(2, 1, _line("late"), False)])  # its worker, back too late: not taken
    assert _lines_stored(redis_db, "req_1") == ["one", "log cut at 100 bytes"]
    assert 0 < redis_db.pttl(keys.run_logs("req_1")) <= LOG_TAIL_SECONDS * 1000


def test_the_log_stream_expires_with_the_record_while_the_run_goes_and_soon_after_its_end(
        runs: RunStore, redis_db: redis.Redis) -> None:
    _running(runs, "req_1")
    runs.add_output("req_1", [], [_logged(0, 0, "only")])
    assert LOG_TAIL_SECONDS * 1000 < redis_db.pttl(keys.run_logs("req_1")) <= TTL_SECONDS * 1000
    _finish(runs, "req_1", [_line("only")])
    assert 0 < redis_db.pttl(keys.run_logs("req_1")) <= LOG_TAIL_SECONDS * 1000
    assert 0 < redis_db.pttl(keys.run_events("req_1")) <= TTL_SECONDS * 1000


def test_the_events_stream_expires_with_the_record_while_the_run_goes(runs: RunStore, redis_db: redis.Redis) -> None:
    # A run whose end is never written (its record lost, say) must not leave its chunks behind for good.
    _running(runs, "req_1")
    runs.add_chunks("req_1", [("step", 1, 0)])
    assert 0 < redis_db.pttl(keys.run_events("req_1")) <= TTL_SECONDS * 1000
    runs.add_output("req_1", [("step", 2, 1)], [_logged(0, 1, "and a line")])
    assert 0 < redis_db.pttl(keys.run_events("req_1")) <= TTL_SECONDS * 1000
