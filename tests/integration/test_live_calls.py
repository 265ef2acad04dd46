"""A running run's calls, live: its worker publishes each model and workflow call as it starts and every call as it
ends, GET /api/v1/runs/<id> and the console's run page show them while the run goes, and the record takes over at
the end. Runs are held at a gate of the stand-in provider (a model ``hold-<gate>``) until the test opens it."""
from __future__ import annotations

import html
import time
import uuid
from typing import Any

import pytest
import redis
import requests

from flowpool import keys
from flowpool.devstack import Stack
from flowpool.live_calls import merge
from flowpool.runs import LOG_TAIL_SECONDS
from tests.helpers import Client, console_session, eventually
from tests.provider import StandInProvider

# Fetches a document, then asks its application's intent with the model named in its input (a held one); a secret
# (the request's ``token``, if any) ends the document's path and the model's name and is in the message.
ASKS = """
    APPLICATION = "{app}"

    def execute(ctx):
        secret = (ctx.secrets or {{}}).get("token", "")
        ctx.http.get("{origin}/doc/" + ctx.input["doc"] + secret)
        resp = ctx.chat.completions.create(intent="answer", model=ctx.input["model"] + secret,
                                           messages=[{{"role": "user", "content": "my key is " + secret}}])
        return resp["choices"][0]["message"]["content"]
"""

# Calls a workflow inline, which asks a held model.
CALLER = """
    def execute(ctx):
        return ctx.workflows.call("{child}", input=ctx.input)
"""
CHILD = """
    APPLICATION = "{app}"

    def execute(ctx):
        resp = ctx.chat.completions.create(intent="answer", model=ctx.input["model"],
                                           messages=[{{"role": "user", "content": "nested"}}])
        return resp["choices"][0]["message"]["content"]
"""


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def app(client: Client, provider: StandInProvider) -> str:
    """An application whose intent ``answer`` asks the stand-in provider."""
    name = _name("live-app")
    put = client.request("PUT", f"/api/v1/applications/{name}",
                         json={"intents": {"answer": {"model": "echo", "base_url": provider.base_url}}})
    assert put.status_code == 201, put.text
    return name


def _start(client: Client, ref: str, **body: Any) -> str:
    response = client.post("/api/v1/runs", json={"model": f"workflow:{ref}", **body})
    assert response.status_code == 202, response.text
    return response.json()["request_id"]


def _ended(client: Client, request_id: str) -> dict[str, Any]:
    """The run once it has ended, which it did by succeeding."""
    run = client.ended(request_id)
    assert run["status"] == "succeeded", run
    return run


def _held(provider: StandInProvider, gate: str) -> None:
    eventually(lambda: provider.held(gate) == 1, timeout=30, what=f"a model call to wait at gate {gate}")


def _live_entries(db: redis.Redis, request_id: str) -> list[bytes]:
    return db.lrange(keys.run_calls(request_id), 0, -1)


def test_a_held_model_call_shows_as_running_then_as_its_record_keeps_it(
        client: Client, app: str, provider: StandInProvider, stack: Stack, stack_db: redis.Redis) -> None:
    ref, gate = _name("live-asks"), uuid.uuid4().hex
    client.upload(ref, ASKS.format(app=app, origin=provider.origin))
    request_id = _start(client, ref, input={"doc": "manual", "model": f"hold-{gate}"})
    _held(provider, gate)

    run = client.run(request_id)
    assert run["status"] == "running"
    [call] = run["model_calls"]
    assert (call["status"], call["kind"], call["model"], call["application"], call["intent"], call["fallback"]) == \
        ("running", "model", f"hold-{gate}", app, "answer", 0)
    assert run["started_at"] <= call["started_at"] <= time.time()
    assert call.get("latency_ms") is None and call["call_id"]
    # The HTTP call before it ended already: it shows as the record will keep it.
    [fetched] = run["http_calls"]
    assert (fetched["path"], fetched["status"], fetched["status_code"]) == ("/doc/manual", "ok", 200)
    assert fetched["started_at"] <= call["started_at"] and run["workflow_calls"] == []

    assert stack.api_url is not None
    console = console_session(stack.api_url, client.key)
    detail = console.get(f"{stack.api_url}/console/runs/{request_id}/detail", timeout=30)
    assert detail.status_code == 200  # still polled
    page = html.unescape(detail.text)
    assert "tl-seg-call-running" in page and f"model hold-{gate}" in page and "in progress" in page

    provider.open_gate(gate)
    ended = _ended(client, request_id)
    [kept] = ended["model_calls"]
    assert (kept["status"], kept["model"], kept["started_at"]) == ("ok", f"hold-{gate}", call["started_at"])
    assert kept["latency_ms"] > 0 and "call_id" not in kept
    # The live list's last word on the call is its end, the record's entry, under the same id.
    live = merge(_live_entries(stack_db, request_id))
    [last] = live["model_calls"]
    assert last == {**kept, "call_id": call["call_id"]}
    final = console.get(f"{stack.api_url}/console/runs/{request_id}/detail", timeout=30)
    assert final.status_code == 286
    assert "tl-seg-call-running" not in final.text and f"model hold-{gate}" in html.unescape(final.text)


def test_a_secret_in_a_call_never_reaches_its_live_entries(
        client: Client, app: str, provider: StandInProvider, stack_db: redis.Redis) -> None:
    ref, gate, secret = _name("live-secret"), uuid.uuid4().hex, f"sk-live-{uuid.uuid4().hex}"
    client.upload(ref, ASKS.format(app=app, origin=provider.origin))
    request_id = _start(client, ref, input={"doc": "d-", "model": f"hold-{gate}"}, secrets={"token": secret})
    _held(provider, gate + secret)

    shown = client.get(f"/api/v1/runs/{request_id}")
    assert shown.status_code == 200 and secret not in shown.text
    run = shown.json()["data"]
    [call] = run["model_calls"]
    [fetched] = run["http_calls"]
    assert (call["status"], call["model"]) == ("running", f"hold-{gate}[redacted]")
    assert fetched["path"] == "/doc/d-[redacted]"
    assert secret.encode() not in b"".join(_live_entries(stack_db, request_id))

    provider.open_gate(gate + secret)
    _ended(client, request_id)
    entries = _live_entries(stack_db, request_id)
    assert len(entries) == 3 and secret.encode() not in b"".join(entries)  # start and end of one, end of the other


def test_a_workflow_called_inline_shows_while_it_goes(
        client: Client, app: str, provider: StandInProvider) -> None:
    caller, child, gate = _name("live-caller"), _name("live-child"), uuid.uuid4().hex
    client.upload(child, CHILD.format(app=app))
    client.upload(caller, CALLER.format(child=child))
    request_id = _start(client, caller, input={"model": f"hold-{gate}"})
    _held(provider, gate)

    run = client.run(request_id)
    [nested] = run["workflow_calls"]
    assert (nested["workflow"], nested["status"], nested["caller"], nested["depth"]) == (child, "running", caller, 1)
    [call] = run["model_calls"]
    assert (call["status"], call["workflow"]) == ("running", child)  # made by the nested workflow
    assert nested["started_at"] <= call["started_at"]

    provider.open_gate(gate)
    ended = _ended(client, request_id)
    assert [c["status"] for c in ended["workflow_calls"]] == ["ok"]
    assert [c["status"] for c in ended["model_calls"]] == ["ok"]


def test_the_live_calls_outlive_the_end_only_a_few_minutes(
        client: Client, app: str, provider: StandInProvider, stack_db: redis.Redis) -> None:
    ref, gate = _name("live-ttl"), uuid.uuid4().hex
    client.upload(ref, ASKS.format(app=app, origin=provider.origin))
    request_id = _start(client, ref, input={"doc": "ttl", "model": f"hold-{gate}"})
    _held(provider, gate)
    key = keys.run_calls(request_id)
    # While it goes: past its deadline (its time limit, and more), plus the few minutes.
    assert stack_db.pttl(key) > LOG_TAIL_SECONDS * 1000

    provider.open_gate(gate)
    _ended(client, request_id)
    assert 0 < stack_db.pttl(key) <= LOG_TAIL_SECONDS * 1000
    # The record, not the list, answers for an ended run: its calls stand when the list is gone.
    stack_db.delete(key)
    ended = client.run(request_id)
    assert [c["status"] for c in ended["model_calls"]] == ["ok"] and len(ended["http_calls"]) == 1


def test_a_run_without_calls_writes_no_live_list(client: Client, stack_db: redis.Redis) -> None:
    ref = _name("live-none")
    client.upload(ref, """
        def execute(ctx):
            return 1
    """)
    response = client.invoke(ref)
    assert response.status_code == 200, response.text
    assert not stack_db.exists(keys.run_calls(response.json()["request_id"]))


def test_an_unsigned_console_reader_sees_no_live_calls(client: Client, app: str, provider: StandInProvider,
                                                       stack: Stack) -> None:
    ref, gate = _name("live-other"), uuid.uuid4().hex
    client.upload(ref, ASKS.format(app=app, origin=provider.origin))
    request_id = _start(client, ref, input={"doc": "x", "model": f"hold-{gate}"})
    _held(provider, gate)
    try:
        assert stack.api_url is not None
        other = Client(stack.api_url, stack.create_account(_name("other")))
        assert other.get(f"/api/v1/runs/{request_id}").status_code == 404
        anonymous = requests.get(f"{stack.api_url}/console/runs/{request_id}/detail", allow_redirects=False,
                                 timeout=30)
        assert anonymous.status_code == 303 and f"hold-{gate}" not in anonymous.text
    finally:
        provider.open_gate(gate)
    _ended(client, request_id)
