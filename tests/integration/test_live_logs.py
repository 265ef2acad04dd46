"""A running run's log lines, live: in ``GET /api/v1/runs/{id}`` and, asked for, in its SSE stream, while the run
still waits at a gate; never in an invoke's stream, nor read by its waiters; cut at the log's limit as the record
is; kept by a run that was lost; none for a cache hit; nothing for a run that logs nothing."""
from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import redis
import requests

from flowpool import keys
from flowpool.devstack import Stack
from flowpool.errors import WorkerLost
from flowpool.run import RunStatus
from flowpool.runs import RunStore
from tests.helpers import Client, eventually, sse_events
from tests.provider import StandInProvider

# Logs (print, and ctx.log with a request secret), emits, waits at a gate, then logs and emits again.
LOGS_AND_HOLDS = """\
def execute(ctx):
    print("starting")
    ctx.emit("tick", 0)
    ctx.log.info("waiting at the gate", token=ctx.secrets["TOKEN"])
    ctx.http.get("{origin}/hold/{gate}")
    ctx.log.warning("released")
    ctx.emit("tick", 1)
    return {{"ticks": 2}}
"""

# Past its log limit before it waits: the lines so far end with the line saying the log was cut.
LOGS_PAST_ITS_LIMIT_AND_HOLDS = """\
LIMITS = {{"log_bytes": 400}}


def execute(ctx):
    for n in range(20):
        ctx.log.info("line " + str(n) + " " + "x" * 30)
    ctx.http.get("{origin}/hold/{gate}")
    ctx.log.info("after the gate")
    return "ok"
"""

EMITS_AND_HOLDS = """\
def execute(ctx):
    ctx.emit("tick", 0)
    ctx.http.get("{origin}/hold/{gate}")
    return "ok"
"""

# Between two emits, 500 short pauses, printing a line after each when ``prints``: the same run with and without
# its lines (each line on its own, as a run that logs as it works sends them).
PAUSES = """\
import time


def execute(ctx):
    ctx.emit("tick", 0)
    for n in range(500):
        time.sleep(0.002)
        if {prints}:
            print("line", n)
    ctx.emit("tick", 1)
    return "ok"
"""

# Logs a line after its first chunk, then stays quiet, making no ctx call, till it is cancelled.
LOGS_THEN_SLEEPS = """\
import time


def execute(ctx):
    ctx.emit("tick", 0)
    ctx.log.info("alone")
    time.sleep(60)
    return "ok"
"""

# Lines and chunks by turns, then an answer that may be cached.
LOGS_AND_EMITS_BY_TURNS = """\
CACHE_TTL_SECONDS = 600


def execute(ctx):
    for n in range(3):
        ctx.log.info("before " + str(n))
        ctx.emit("tick", n)
        print("after", n)
    return "ok"
"""


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _kind(event: dict[str, Any]) -> str:
    """What an SSE event carries: its data's ``object``, or ``[DONE]``."""
    return "[DONE]" if event["data"] == "[DONE]" else str(event["data"]["object"])


def _held_run(client: Client, provider: StandInProvider, ref: str, gate: str, answers: list[requests.Response],
              **body: Any) -> tuple[threading.Thread, str]:
    """Invoke ``ref`` in a thread and wait until its run waits at ``gate``; the thread and the run's request_id."""
    caller = threading.Thread(target=lambda: answers.append(client.invoke(ref, cache=False, **body)))
    caller.start()
    eventually(lambda: provider.held(gate) == 1, timeout=30, what="the run waits at the gate")
    response = client.get(f"/api/v1/workflows/{ref}/runs")
    assert response.status_code == 200, response.text
    (run,) = response.json()["data"]
    return caller, str(run["request_id"])


def _ids(event_id: str) -> bool:
    """Whether an SSE id is an opted-in stream's: ``<events entry id>.<log entry id>``."""
    events_id, dot, logs_id = event_id.partition(".")
    return bool(dot) and all(part.replace("-", "", 1).isdigit() for part in (events_id, logs_id))


def _opted_in(client: Client, request_id: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.get(f"/api/v1/runs/{request_id}/stream", params={"logs": "true"}, headers=headers, stream=True,
                    timeout=30) as response:
        assert response.status_code == 200, response.text
        return list(sse_events(response))


def _released(provider: StandInProvider, gate: str, caller: threading.Thread) -> None:
    provider.open_gate(gate)
    caller.join(60)


def _log(msg: str, level: str = "info", **fields: Any) -> Callable[[dict[str, Any]], bool]:
    """A matcher of a log line as shown: its level, msg and fields (its time is the run's own)."""
    return lambda line: (line["level"], line["msg"], line.get("fields")) == (level, msg, fields or None)


def test_a_running_runs_log_lines_show_in_its_record_and_its_opted_in_stream_while_it_waits(
        client: Client, provider: StandInProvider) -> None:
    ref, gate, secret = _ref("logs"), uuid.uuid4().hex, f"tok-{uuid.uuid4().hex}"
    client.upload(ref, LOGS_AND_HOLDS.format(origin=provider.origin, gate=gate))
    answers: list[requests.Response] = []
    caller, request_id = _held_run(client, provider, ref, gate, answers, secrets={"TOKEN": secret})
    try:
        run = client.run(request_id)
        assert run["status"] == "running"
        starting, waiting = run["logs"]
        assert _log("starting", stream="stdout")(starting)
        assert _log("waiting at the gate", token="[redacted]")(waiting)  # redacted live, as in the record
        assert run["chunks"] == [{"type": "tick", "content": 0}] and run["logs_truncated"] is False

        with client.get(f"/api/v1/runs/{request_id}/stream", params={"logs": "true"}, stream=True,
                        timeout=30) as response:
            assert response.status_code == 200
            events = sse_events(response)
            so_far = [next(events) for _ in range(3)]
            assert provider.held(gate) == 1  # read while the run still waits
            assert [e.get("event") for e in so_far] == ["log", None, "log"]
            assert [_kind(e) for e in so_far] == ["workflow.log", "workflow.chunk", "workflow.log"]
            assert _log("starting", stream="stdout")(so_far[0]["data"]) and so_far[1]["data"]["content"] == 0
            assert _log("waiting at the gate", token="[redacted]")(so_far[2]["data"])
            assert so_far[2]["data"]["request_id"] == request_id and so_far[2]["data"]["index"] == 1
            provider.open_gate(gate)
            rest = list(events)
    finally:
        _released(provider, gate, caller)
    assert [a.status_code for a in answers] == [200]
    assert [e.get("event") for e in rest] == ["log", None, None, None]
    assert _log("released", "warning")(rest[0]["data"])
    assert rest[1]["data"]["content"] == 1 and rest[2]["data"]["output"] == {"ticks": 2} and rest[3]["data"] == "[DONE]"
    assert secret not in json.dumps(so_far + rest)

    # The record keeps the same lines; resumed after the first log line, the rest in order.
    assert [line["msg"] for line in client.run(request_id)["logs"]] == ["starting", "waiting at the gate", "released"]
    assert all(_ids(e["id"]) for e in so_far + rest[:-1])  # an opted-in stream's ids name both streams' entries
    with client.get(f"/api/v1/runs/{request_id}/stream", params={"logs": "true"},
                    headers={"Last-Event-ID": so_far[0]["id"]}, stream=True, timeout=30) as resumed:
        kinds = [_kind(e) for e in sse_events(resumed)]
    assert kinds == ["workflow.chunk", "workflow.log", "workflow.log", "workflow.chunk", "chat.completion", "[DONE]"]
    # Not asked for, the run's stream is the one an invoke gets: no log events.
    with client.get(f"/api/v1/runs/{request_id}/stream", stream=True, timeout=30) as plain:
        events_seen = list(sse_events(plain))
    assert all("event" not in e for e in events_seen)
    assert [_kind(e) for e in events_seen] == ["workflow.chunk", "workflow.chunk", "chat.completion", "[DONE]"]
    assert client.get(f"/api/v1/runs/{request_id}/stream", params={"logs": "maybe"}).status_code == 400
    # Each form of id goes with its own stream only.
    for params, last in (({"logs": "true"}, events_seen[0]["id"]), ({}, so_far[0]["id"]), ({"logs": "true"}, "x")):
        assert client.get(f"/api/v1/runs/{request_id}/stream", params=params,
                          headers={"Last-Event-ID": last}).status_code == 400


def test_an_invoke_stream_of_a_run_that_logs_carries_no_log_events(client: Client, provider: StandInProvider) -> None:
    ref, gate = _ref("logs"), uuid.uuid4().hex
    client.upload(ref, LOGS_AND_HOLDS.format(origin=provider.origin, gate=gate))
    provider.open_gate(gate)  # it runs straight through
    with client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {}, "stream": True,
                                                         "cache": False, "secrets": {"TOKEN": "tok-1234"}},
                     stream=True, timeout=30) as response:
        assert response.status_code == 200
        events = list(sse_events(response))
    assert all("event" not in e for e in events)
    assert [_kind(e) for e in events] == ["workflow.chunk", "workflow.chunk", "chat.completion", "[DONE]"]
    run = client.run(events[0]["data"]["request_id"])
    assert [line["msg"] for line in run["logs"]] == ["starting", "waiting at the gate", "released"]


def test_the_log_cut_applies_live_as_in_the_record(client: Client, provider: StandInProvider) -> None:
    ref, gate = _ref("cut"), uuid.uuid4().hex
    client.upload(ref, LOGS_PAST_ITS_LIMIT_AND_HOLDS.format(origin=provider.origin, gate=gate))
    answers: list[requests.Response] = []
    caller, request_id = _held_run(client, provider, ref, gate, answers)
    try:
        live = client.run(request_id)
    finally:
        _released(provider, gate, caller)
    assert [a.status_code for a in answers] == [200]
    assert live["status"] == "running" and live["logs_truncated"] is True
    assert 1 < len(live["logs"]) < 20 and _log("log cut at 400 bytes", "warning")(live["logs"][-1])
    assert all(line["msg"].startswith("line ") for line in live["logs"][:-1])
    ended = client.run(request_id)
    assert ended["logs"] == live["logs"] and ended["logs_truncated"] is True  # nothing after the cut, live or kept


def test_a_run_that_logs_nothing_writes_no_log_entry(client: Client, provider: StandInProvider,
                                                     stack: Stack) -> None:
    ref, gate = _ref("quiet"), uuid.uuid4().hex
    client.upload(ref, EMITS_AND_HOLDS.format(origin=provider.origin, gate=gate))
    answers: list[requests.Response] = []
    store = redis.Redis.from_url(str(stack.redis_url))
    try:
        caller, request_id = _held_run(client, provider, ref, gate, answers)
        try:
            eventually(lambda: store.xlen(keys.run_events(request_id)) == 1, timeout=30, what="the chunk is written")
            held = [fields[b"kind"] for _, fields in store.xrange(keys.run_events(request_id))]
            assert client.run(request_id)["logs"] == [] and not store.exists(keys.run_logs(request_id))
        finally:
            _released(provider, gate, caller)
        ended = [fields[b"kind"] for _, fields in store.xrange(keys.run_events(request_id))]
        assert not store.exists(keys.run_logs(request_id))
    finally:
        store.close()
    assert [a.status_code for a in answers] == [200]
    assert held == [b"chunk"] and ended == [b"chunk", b"done"]


def _calls(store: redis.Redis, command: str) -> int:
    """How many times the Redis server ran ``command`` so far (INFO commandstats)."""
    return int(store.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_waiters_reads_do_not_grow_with_the_lines_its_run_logs(client: Client, stack: Stack) -> None:
    store = redis.Redis.from_url(str(stack.redis_url))
    reads = {}
    try:
        for prints in (False, True):
            ref = _ref("pauses")
            client.upload(ref, PAUSES.format(prints=prints))
            before = _calls(store, "xread")
            response = client.invoke(ref, cache=False)
            reads[prints] = _calls(store, "xread") - before
            assert response.status_code == 200, response.text
            assert len(client.run(response.json()["request_id"])["logs"]) == (500 if prints else 0)
    finally:
        store.close()
    # The waiter reads the events stream only: its chunks and its end wake it, the log lines do not (one more
    # read at most: a run a little longer may see one more of its reads time out).
    assert reads[True] <= reads[False] + 1, reads


def test_a_lost_run_shows_the_lines_it_logged_live(client: Client, provider: StandInProvider, stack: Stack) -> None:
    ref, gate, secret = _ref("lost"), uuid.uuid4().hex, f"tok-{uuid.uuid4().hex}"
    client.upload(ref, LOGS_AND_HOLDS.format(origin=provider.origin, gate=gate))
    answers: list[requests.Response] = []
    store = redis.Redis.from_url(str(stack.redis_url))
    try:
        caller, request_id = _held_run(client, provider, ref, gate, answers, secrets={"TOKEN": secret})
        try:
            # Taken for lost while it waits, as the reaper takes an overdue run.
            assert RunStore(store, 600, 10).abandon(request_id, RunStatus.RUNNING, WorkerLost("taken for lost"),
                                                    None, force=True)
            run = client.run(request_id)
        finally:
            _released(provider, gate, caller)
    finally:
        store.close()
    assert run["status"] == "lost"
    assert [line["msg"] for line in run["logs"]] == ["starting", "waiting at the gate"]
    assert _log("waiting at the gate", token="[redacted]")(run["logs"][1]) and run["logs_truncated"] is False
    assert client.run(request_id)["logs"] == run["logs"]  # its worker, back too late, changes nothing


def test_a_cache_hits_opted_in_stream_carries_no_log_events(client: Client) -> None:
    ref = _ref("cached")
    client.upload(ref, LOGS_AND_EMITS_BY_TURNS)
    first, hit = (client.invoke(ref, input={"n": 1}) for _ in range(2))
    assert first.status_code == hit.status_code == 200 and hit.headers["X-Cache"] == "HIT"

    events = _opted_in(client, hit.json()["request_id"])
    assert [_kind(e) for e in events] == ["workflow.chunk"] * 3 + ["chat.completion", "[DONE]"]
    assert all("event" not in e for e in events)
    assert [_kind(e) for e in _opted_in(client, first.json()["request_id"])].count("workflow.log") == 6


def test_an_opted_in_stream_resumed_from_any_of_its_events_gives_each_chunk_and_line_once(client: Client) -> None:
    ref = _ref("turns")
    client.upload(ref, LOGS_AND_EMITS_BY_TURNS)
    response = client.invoke(ref, cache=False)
    assert response.status_code == 200, response.text
    events = _opted_in(client, response.json()["request_id"])
    shown = [(_kind(e), e["data"].get("msg", e["data"].get("content"))) for e in events[:-2]]
    assert shown == [item for n in range(3) for item in (
        ("workflow.log", f"before {n}"), ("workflow.chunk", n), ("workflow.log", f"after {n}"))]
    assert all(_ids(e["id"]) for e in events[:-1])
    for at, event in enumerate(events[:-2]):  # from each but the end (past it, the stream has nothing to say)
        assert _shown(_opted_in(client, response.json()["request_id"], event["id"])) == _shown(events[at + 1:])


def _shown(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a stream's events say, but the time its completion was made."""
    return [(e.get("event"), e.get("id"), _kind(e), e["data"] if _kind(e).startswith("workflow.") else None)
            for e in events]


def test_a_line_logged_before_the_run_goes_quiet_shows_while_it_is_quiet(client: Client) -> None:
    ref = _ref("quiet")
    client.upload(ref, LOGS_THEN_SLEEPS)
    with client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {}, "stream": True,
                                                         "cache": False, "on_disconnect": "cancel"},
                     stream=True, timeout=30) as response:
        request_id = response.headers["X-Request-Id"]
        assert _kind(next(sse_events(response))) == "workflow.chunk"
        # No emit and no ctx call follows the line: it goes out on its own timer, not with the end.
        run = eventually(lambda: (r := client.run(request_id))["logs"] and r, timeout=20, what="the line shows")
    assert run["status"] == "running" and [line["msg"] for line in run["logs"]] == ["alone"]
    eventually(lambda: client.run(request_id)["status"] == "cancelled", timeout=20, what="the run is cancelled")
