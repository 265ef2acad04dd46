"""A running run's log lines, live: in ``GET /api/v1/runs/{id}`` and, asked for, in its SSE stream, while the run
still waits at a gate; never in an invoke's stream; cut at the log's limit as the record is; nothing for a run that
logs nothing."""
from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis
import requests

from flowpool import keys
from flowpool.devstack import Stack
from tests.helpers import Client, eventually
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


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _sse(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The SSE events of ``response`` as they arrive: ``event`` (when named), ``id`` and ``data``."""
    event: dict[str, Any] = {}
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event["event"] = line[7:]
        elif line.startswith("id: "):
            event["id"] = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
            event["data"] = data if data == "[DONE]" else json.loads(data)
        elif not line and event:
            yield event
            event = {}


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
            events = _sse(response)
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
    with client.get(f"/api/v1/runs/{request_id}/stream", params={"logs": "true"},
                    headers={"Last-Event-ID": so_far[0]["id"]}, stream=True, timeout=30) as resumed:
        kinds = [_kind(e) for e in _sse(resumed)]
    assert kinds == ["workflow.chunk", "workflow.log", "workflow.log", "workflow.chunk", "chat.completion", "[DONE]"]
    # Not asked for, the run's stream is the one an invoke gets: no log events.
    with client.get(f"/api/v1/runs/{request_id}/stream", stream=True, timeout=30) as plain:
        events_seen = list(_sse(plain))
    assert all("event" not in e for e in events_seen)
    assert [_kind(e) for e in events_seen] == ["workflow.chunk", "workflow.chunk", "chat.completion", "[DONE]"]
    assert client.get(f"/api/v1/runs/{request_id}/stream", params={"logs": "maybe"}).status_code == 400


def test_an_invoke_stream_of_a_run_that_logs_carries_no_log_events(client: Client, provider: StandInProvider) -> None:
    ref, gate = _ref("logs"), uuid.uuid4().hex
    client.upload(ref, LOGS_AND_HOLDS.format(origin=provider.origin, gate=gate))
    provider.open_gate(gate)  # it runs straight through
    with client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {}, "stream": True,
                                                         "cache": False, "secrets": {"TOKEN": "tok-1234"}},
                     stream=True, timeout=30) as response:
        assert response.status_code == 200
        events = list(_sse(response))
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
            assert client.run(request_id)["logs"] == []
        finally:
            _released(provider, gate, caller)
        ended = [fields[b"kind"] for _, fields in store.xrange(keys.run_events(request_id))]
    finally:
        store.close()
    assert [a.status_code for a in answers] == [200]
    assert held == [b"chunk"] and ended == [b"chunk", b"done"]
