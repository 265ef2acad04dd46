"""Async runs over HTTP against the session's stack: POST /api/v1/runs, long polls, and signed webhooks.

Webhooks go to a receiver on 127.0.0.1, which the test stack's egress policy
allows (FLOWPOOL_EGRESS_ALLOW=127.0.0.1/32); 127.0.0.2 stays refused, so the
refusal is shown on loopback too.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Iterator

import pytest
import redis
import requests

import flowpool
from flowpool.devstack import Stack
from flowpool.registry import Accounts
from tests.helpers import Client, account_id, eventually
from tests.provider import StandInProvider
from tests.webhook_receiver import WebhookReceiver

RUNS = "/api/v1/runs"

# Waits at a gate of the stand-in provider until the test opens it, then answers its input.
HELD = """
    INPUT_SCHEMA = {{"text": {{"type": "string", "required": True}}}}

    def execute(ctx):
        ctx.emit("progress", "waiting")
        ctx.http.get("{origin}/hold/{gate}")
        return {{"echo": ctx.input["text"]}}
"""

# As HELD, but sends nothing till its end: a long poll on it hears nothing from the run.
SILENT = """
    def execute(ctx):
        ctx.http.get("{origin}/hold/{gate}")
        return {{"done": True}}
"""

NONCE = """
    import uuid

    def execute(ctx):
        return {"nonce": uuid.uuid4().hex, "text": ctx.input["text"]}
"""


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _held(client: Client, provider: StandInProvider) -> tuple[str, str]:
    """A workflow whose runs wait at a gate of their own: its ref and the gate."""
    ref, gate = _ref("held"), uuid.uuid4().hex
    client.upload(ref, HELD.format(origin=provider.origin, gate=gate))
    return ref, gate


def _start(client: Client, ref: str, headers: dict[str, str] | None = None, **body: Any) -> requests.Response:
    body.setdefault("model", f"workflow:{ref}")
    body.setdefault("input", {"text": "hi"})
    return client.post(RUNS, json=body, headers=headers or {})


def _runs_of(client: Client, ref: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/workflows/{ref}/runs")
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _secret(stack_db: redis.Redis, client: Client) -> str:
    """The webhook secret of the client's account (made on first use)."""
    return Accounts(stack_db).webhook_secret(account_id(stack_db, client))


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def test_a_started_run_answers_202_at_once_with_urls_that_show_and_stream_it(
        client: Client, provider: StandInProvider) -> None:
    ref, gate = _held(client, provider)

    response = _start(client, ref)

    assert response.status_code == 202, response.text
    data = response.json()  # the keys at the top level, as the issue names them
    request_id = data["request_id"]
    assert data == {"request_id": request_id, "status": "queued", "status_url": f"/api/v1/runs/{request_id}",
                    "stream_url": f"/api/v1/runs/{request_id}/stream"}
    assert response.headers["Location"] == data["status_url"] and response.headers["X-Request-Id"] == request_id
    going = client.get(data["status_url"]).json()["data"]
    assert going["status"] in ("queued", "running") and going["webhook"] is None
    eventually(lambda: provider.held(gate) == 1, timeout=20, what="the run waiting at its gate")

    provider.open_gate(gate)
    stream = client.get(data["stream_url"], stream=True)
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in stream.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert events[0]["content"] == "waiting" and events[-1]["output"] == {"echo": "hi"}
    done = eventually(lambda: (run := client.run(request_id))["status"] == "succeeded" and run, timeout=20,
                      what="the run's end in its record")
    assert done["output"] == {"echo": "hi"} and done["cache_hit"] is False


def test_wait_answers_when_the_run_ends_and_with_the_run_still_going_when_it_runs_out(
        client: Client, provider: StandInProvider) -> None:
    ref, gate = _held(client, provider)
    request_id = _start(client, ref).json()["request_id"]

    began = time.monotonic()
    going = client.get(f"{RUNS}/{request_id}", params={"wait": "0.5"})
    assert going.status_code == 200 and going.json()["data"]["status"] in ("queued", "running")
    assert time.monotonic() - began >= 0.5

    eventually(lambda: provider.held(gate) == 1, timeout=20, what="the run waiting at its gate")
    opener = threading.Timer(1.0, provider.open_gate, args=(gate,))
    opener.start()
    try:
        began = time.monotonic()
        ended = client.get(f"{RUNS}/{request_id}", params={"wait": "30"})
        waited = time.monotonic() - began
    finally:
        opener.join()
    assert ended.status_code == 200, ended.text
    assert ended.json()["data"]["status"] == "succeeded" and ended.json()["data"]["output"] == {"echo": "hi"}
    assert waited < 25  # answered at the run's end, not at the wait's

    for bad in ("-1", "soon", "nan"):
        answer = client.get(f"{RUNS}/{request_id}", params={"wait": bad})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "wait"


@pytest.mark.timeout(60)
def test_a_tiny_wait_answers_at_once_not_when_the_run_next_sends_something(
        client: Client, provider: StandInProvider) -> None:
    """A poll shorter than a millisecond once became XREAD BLOCK 0, which waits forever: here, till the gate."""
    ref, gate = _ref("silent"), uuid.uuid4().hex
    client.upload(ref, SILENT.format(origin=provider.origin, gate=gate))
    request_id = _start(client, ref).json()["request_id"]
    try:
        queued = client.get(f"{RUNS}/{request_id}", params={"wait": "0.0001"}, timeout=10)
        assert queued.status_code == 200 and queued.json()["data"]["status"] in ("queued", "running")
        eventually(lambda: provider.held(gate) == 1, timeout=20, what="the run waiting at its gate")
        for wait in ("0.0001", "0.004"):
            running = client.get(f"{RUNS}/{request_id}", params={"wait": wait}, timeout=10)
            assert running.status_code == 200 and running.json()["data"]["status"] == "running"
    finally:
        provider.open_gate(gate)


def test_a_cache_hit_answers_200_at_once_with_the_run(client: Client) -> None:
    ref = _ref("nonce")
    client.upload(ref, NONCE)
    first = _start(client, ref, input={"text": "same"}).json()
    done = client.get(f"{RUNS}/{first['request_id']}", params={"wait": "30"}).json()["data"]
    assert done["status"] == "succeeded"

    response = _start(client, ref, input={"text": "same"})

    assert response.status_code == 200, response.text
    hit = response.json()  # the URLs and the run's fields, all at the top level
    assert hit["request_id"] != first["request_id"] and response.headers["X-Cache"] == "HIT"
    assert hit["status"] == "succeeded" and hit["cache_hit"] is True and hit["output"] == done["output"]
    assert hit["origin_request_id"] == first["request_id"]
    assert hit["status_url"] == f"/api/v1/runs/{hit['request_id']}" and hit["webhook"] is None


@pytest.mark.parametrize("body, named", [
    ({"input": {"wrong": 1}}, "text"),  # the INPUT_SCHEMA's required field
    ({"input": {"text": "hi"}, "webhook_url": "ftp://127.0.0.1/hook"}, "webhook_url"),
    ({"input": {"text": "hi"}, "webhook_url": "http://user:pw@127.0.0.1/hook"}, "webhook_url"),
    ({"input": {"text": "hi"}, "webhook_url": "http://127.0.0.1/" + "x" * 2048}, "webhook_url"),
    ({"input": {"text": "hi"}, "webhook_url": "http://127.0.0.1:99999/hook"}, "webhook_url"),  # no such port
    ({"input": {"text": "hi"}, "webhook_url": "http://127.0.0.1:abc/hook"}, "webhook_url"),
    ({"input": {"text": "hi"}, "webhook_url": "http://127.0.0.1:0/hook"}, "webhook_url"),
])
def test_bad_input_is_a_400_and_nothing_is_queued(client: Client, provider: StandInProvider,
                                                   body: dict[str, Any], named: str) -> None:
    ref, _ = _held(client, provider)

    response = _start(client, ref, **body)

    assert response.status_code == 400, response.text
    assert named in response.json()["error"]["message"]
    assert _runs_of(client, ref) == []


def test_a_webhook_the_egress_guard_refuses_is_a_400_at_submission_with_the_guards_reason(
        client: Client, provider: StandInProvider, stack_db: redis.Redis) -> None:
    ref, _ = _held(client, provider)

    response = _start(client, ref, webhook_url="http://127.0.0.2:9/hook")  # loopback, but not the allowed /32

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "webhook_url"
    assert "egress guard" in error["message"] and "loopback" in error["message"]
    assert "FLOWPOOL_EGRESS_ALLOW" in error["message"]
    assert _runs_of(client, ref) == []


def test_the_webhook_arrives_signed_with_the_accounts_secret_and_the_run_shows_it_delivered(
        client: Client, provider: StandInProvider, stack_db: redis.Redis, receiver: WebhookReceiver) -> None:
    ref, gate = _held(client, provider)
    response = _start(client, ref, webhook_url=receiver.url, metadata={"order": 7})
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    pending = client.run(request_id)["webhook"]
    assert pending == {"url": receiver.url, "status": "pending", "attempts": [], "next_attempt_at": None}

    provider.open_gate(gate)
    [delivery] = receiver.wait_for(1, timeout=30)

    assert flowpool.verify_webhook(delivery.body, delivery.headers["X-Flowpool-Signature"],
                                   _secret(stack_db, client)) > 0
    assert delivery.headers["X-Flowpool-Webhook-Id"] == request_id
    payload = json.loads(delivery.body)
    assert payload["type"] == "run.completed" and payload["request_id"] == request_id
    assert payload["workflow"] == ref and payload["status"] == "succeeded" and payload["output"] == {"echo": "hi"}
    with pytest.raises(flowpool.WebhookSignatureError):
        flowpool.verify_webhook(delivery.body, delivery.headers["X-Flowpool-Signature"], "whsec_not-the-accounts")
    webhook = eventually(lambda: (w := client.run(request_id)["webhook"])["status"] == "delivered" and w,
                         timeout=10, what="the delivery recorded")
    assert [a["status_code"] for a in webhook["attempts"]] == [200]


def test_a_receiver_that_first_answers_500_gets_the_webhook_again(
        client: Client, provider: StandInProvider, stack_db: redis.Redis) -> None:
    ref = _ref("nonce")
    client.upload(ref, NONCE)
    with WebhookReceiver(statuses=(500, 200)) as receiver:
        request_id = _start(client, ref, webhook_url=receiver.url, cache=False).json()["request_id"]
        first, second = receiver.wait_for(2, timeout=30)

    assert second.at - first.at >= 1.0  # the first retry waits a second at least
    assert first.body == second.body  # the same end, each time signed afresh
    for delivery in (first, second):
        flowpool.verify_webhook(delivery.body, delivery.headers["X-Flowpool-Signature"], _secret(stack_db, client))
    webhook = eventually(lambda: (w := client.run(request_id)["webhook"])["status"] == "delivered" and w,
                         timeout=10, what="the second delivery recorded")
    assert [a["status_code"] for a in webhook["attempts"]] == [500, 200]


def test_a_cache_hit_with_a_webhook_has_its_webhook_delivered_at_once(
        client: Client, stack_db: redis.Redis, receiver: WebhookReceiver) -> None:
    ref = _ref("nonce")
    client.upload(ref, NONCE)
    first = _start(client, ref, input={"text": "again"}).json()["request_id"]
    client.get(f"{RUNS}/{first}", params={"wait": "30"})

    hit = _start(client, ref, input={"text": "again"}, webhook_url=receiver.url)

    assert hit.status_code == 200, hit.text
    [delivery] = receiver.wait_for(1, timeout=30)
    payload = json.loads(delivery.body)
    assert payload["request_id"] == hit.json()["request_id"] and payload["status"] == "succeeded"


def test_an_idempotency_key_names_the_same_run_on_a_retry(client: Client, provider: StandInProvider) -> None:
    ref, gate = _held(client, provider)
    key = {"Idempotency-Key": f"async-{uuid.uuid4().hex}"}

    first = _start(client, ref, headers=key)
    again = _start(client, ref, headers=key)

    assert first.status_code == again.status_code == 202
    assert again.json()["request_id"] == first.json()["request_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    provider.open_gate(gate)
    assert len(_runs_of(client, ref)) == 1


def test_the_sdk_starts_a_run_waits_for_it_and_checks_its_webhook(
        client: Client, stack: Stack, stack_db: redis.Redis, receiver: WebhookReceiver) -> None:
    ref = _ref("nonce")
    client.upload(ref, NONCE)
    sdk = flowpool.Flowpool(api_key=client.key, base_url=client.base_url, timeout=60, max_retries=0)

    started = sdk.workflow.runs.create(model=f"workflow:{ref}", input={"text": "sdk"}, webhook_url=receiver.url)
    assert started.status == "queued" and started.status_url.endswith(started.request_id)
    run = sdk.workflow.runs.get(started.request_id, wait=30)

    assert run.status == "succeeded" and run.output["text"] == "sdk"
    hit = sdk.workflow.runs.create(model=f"workflow:{ref}", input={"text": "sdk"})  # the cache answers: the run
    assert hit.status == "succeeded" and hit.cache_hit is True and hit.output["nonce"] == run.output["nonce"]
    assert hit.status_url.endswith(hit.request_id)
    assert sdk.runs.get(started.request_id).request_id == started.request_id  # the older API still answers
    [delivery] = receiver.wait_for(1, timeout=30)
    assert flowpool.verify_webhook(delivery.body, delivery.headers["X-Flowpool-Signature"],
                                   _secret(stack_db, client))
    with pytest.raises(flowpool.BadRequestError):
        sdk.workflow.runs.create(model=f"workflow:{ref}", input={"text": "x"}, webhook_url="http://127.0.0.2:9/")
