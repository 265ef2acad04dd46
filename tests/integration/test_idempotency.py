"""Retries never repeat work: x-should-retry on every error, and Idempotency-Key joining the first run."""
from __future__ import annotations

import json
import signal
import threading
import uuid
from typing import Any, Iterator

import openai
import psutil
import pytest
import requests

from flowpool.client import Flowpool, InternalServerError
from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer
from tests.conftest import TEST_ENV, second_api
from tests.helpers import Client, error_of, eventually
from tests.provider import StandInProvider

FAILS = """
def execute(ctx):
    ctx.http.post("{origin}/echo", json={{"ran": ctx.input["id"]}})
    raise RuntimeError("boom")
"""

HOLDS = """
def execute(ctx):
    ctx.emit("progress", "waiting")
    ctx.http.get("{origin}/hold/{gate}")
    return {{"id": ctx.input["id"], "request_id": ctx.request_id}}
"""


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _runs(client: Client, ref: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/workflows/{ref}/runs", params={"limit": 100})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _side_effects(provider: StandInProvider, marker: str) -> int:
    """How many runs reached the script's side effect for ``marker``."""
    return sum(1 for body in list(provider.echoed) if marker in body)


def _invoke(client: Client, ref: str, key: str | None, **body: Any) -> requests.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    body.setdefault("model", f"workflow:{ref}")
    return client.post("/workflow/chat/completions", json=body, headers=headers)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.ConnectionError:
        return False


def _events(response: requests.Response) -> Iterator[Any]:
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            yield line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])


def test_a_failing_workflow_called_through_the_openai_client_runs_once(client: Client,
                                                                        provider: StandInProvider) -> None:
    ref, marker = _ref("fails"), uuid.uuid4().hex
    client.upload(ref, FAILS.format(origin=provider.origin))
    oa = openai.OpenAI(api_key=client.key, base_url=client.base_url + "/workflow")  # its default: 2 retries
    assert oa.max_retries == 2
    with pytest.raises(openai.InternalServerError) as failed:
        oa.chat.completions.create(model=f"workflow:{ref}", messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"input": {"id": marker}})
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(_runs(client, ref)) == 1
    assert _side_effects(provider, marker) == 1


def test_a_timed_out_run_is_not_retried_by_the_openai_client(client: Client) -> None:
    ref = _ref("slow")
    client.upload(ref, "import time\n\ndef execute(ctx):\n    time.sleep(30)\n    return 1\n", timeout_seconds=1)
    oa = openai.OpenAI(api_key=client.key, base_url=client.base_url + "/workflow")
    with pytest.raises(openai.APIStatusError) as timed_out:
        oa.chat.completions.create(model=f"workflow:{ref}", messages=[{"role": "user", "content": "hi"}])
    assert timed_out.value.status_code == 408
    assert timed_out.value.response.headers["x-should-retry"] == "false"
    assert len(_runs(client, ref)) == 1


def test_errors_say_whether_a_retry_is_safe(client: Client) -> None:
    missing = client.invoke("no-such-workflow")
    assert missing.status_code == 404 and missing.headers["x-should-retry"] == "false"
    bad = client.post("/workflow/chat/completions", data=b"{", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.headers["x-should-retry"] == "false"


def test_the_same_key_twice_gives_the_first_run_whatever_cache_says(client: Client,
                                                                    provider: StandInProvider) -> None:
    ref, key = _ref("once"), f"k-{uuid.uuid4().hex}"
    client.upload(ref, """
        import random

        def execute(ctx):
            return {"draw": random.random(), "request_id": ctx.request_id}
    """)
    first = _invoke(client, ref, key, input={"q": 1}, cache=False)
    second = _invoke(client, ref, key, input={"q": 1}, cache=True)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert second.json()["request_id"] == first.json()["request_id"]
    assert second.json()["output"] == first.json()["output"]
    assert second.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert len(_runs(client, ref)) == 1
    # Streamed, the replay gives the run's chunks and its answer.
    streamed = _invoke(client, ref, key, input={"q": 1}, stream=True)
    events = list(_events(streamed))
    assert events[-2]["output"] == first.json()["output"] and events[-1] == "[DONE]"
    # Without the key, or with another, it is a request of its own.
    assert _invoke(client, ref, f"k-{uuid.uuid4().hex}", input={"q": 1}, cache=False).json()["request_id"] != \
        first.json()["request_id"]
    assert len(_runs(client, ref)) == 2


def test_a_failed_run_is_replayed_as_it_failed(client: Client, provider: StandInProvider) -> None:
    ref, key, marker = _ref("fails"), f"k-{uuid.uuid4().hex}", uuid.uuid4().hex
    client.upload(ref, FAILS.format(origin=provider.origin))
    first = _invoke(client, ref, key, input={"id": marker})
    second = _invoke(client, ref, key, input={"id": marker})
    assert first.status_code == second.status_code == 500
    assert error_of(second)["request_id"] == error_of(first)["request_id"]
    assert error_of(second)["type"] == "script_error"
    assert _side_effects(provider, marker) == 1


def test_a_key_repeated_while_its_run_goes_joins_it(client: Client, provider: StandInProvider) -> None:
    ref, key, gate = _ref("holds"), f"k-{uuid.uuid4().hex}", uuid.uuid4().hex
    client.upload(ref, HOLDS.format(origin=provider.origin, gate=gate))
    answers: list[requests.Response] = []
    callers = [threading.Thread(target=lambda: answers.append(_invoke(client, ref, key, input={"id": 1}, cache=False)))
               for _ in range(3)]
    for caller in callers:
        caller.start()
    eventually(lambda: provider.held(gate) >= 1, what="the run waits at the gate")
    eventually(lambda: len(_runs(client, ref)) == 1)
    provider.open_gate(gate)
    for caller in callers:
        caller.join(30)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len({a.json()["request_id"] for a in answers}) == 1
    assert len(_runs(client, ref)) == 1


def test_a_key_sent_with_another_request_is_refused(client: Client) -> None:
    ref, key = _ref("echo"), f"k-{uuid.uuid4().hex}"
    client.upload(ref, "def execute(ctx):\n    return ctx.input\n")
    first = _invoke(client, ref, key, input={"q": 1})
    assert first.status_code == 200
    other = _invoke(client, ref, key, input={"q": 2})
    assert other.status_code == 422 and other.headers["x-should-retry"] == "false"
    error = error_of(other)
    assert error["type"] == "idempotency_key_reused" and first.json()["request_id"] in error["message"]
    for bad in ("", "tab\tinside", "x" * 256, "caf\u00e9"):
        response = client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {}},
                               headers={"Idempotency-Key": bad.encode("utf-8").decode("latin-1")})
        assert response.status_code == 400, (bad, response.text)
        assert error_of(response)["param"] == "Idempotency-Key"


def test_keys_belong_to_their_account(client: Client, stack: Stack) -> None:
    assert stack.api_url is not None
    other = Client(stack.api_url, stack.create_account(f"other-{uuid.uuid4().hex[:8]}"))
    key = f"k-{uuid.uuid4().hex}"
    for each in (client, other):
        each.upload("same-name", "def execute(ctx):\n    return ctx.request_id\n")
    mine, theirs = _invoke(client, "same-name", key, input={}), _invoke(other, "same-name", key, input={})
    assert mine.status_code == theirs.status_code == 200
    assert mine.json()["request_id"] != theirs.json()["request_id"]
    assert "Idempotent-Replayed" not in theirs.headers


def test_the_sdk_sends_a_key_and_retries_a_dropped_connection_into_the_same_run(
        client: Client, provider: StandInProvider, redis_server: RedisServer) -> None:
    """An API process killed mid-request: the SDK's retry joins the run instead of starting a second one."""
    ref, gate = _ref("holds"), uuid.uuid4().hex
    client.upload(ref, HOLDS.format(origin=provider.origin, gate=gate))
    with second_api(redis_server, FLOWPOOL_API_WORKERS="2") as api:
        assert api.api_url is not None
        sdk = Flowpool(api_key=client.key, base_url=api.api_url, timeout=60)
        answer: list[Any] = []
        caller = threading.Thread(target=lambda: answer.append(
            sdk.workflow.completions.create(model=f"workflow:{ref}", input={"id": 7}, cache=False)))
        caller.start()
        eventually(lambda: provider.held(gate) == 1, what="the run waits at the gate")
        master = psutil.Process(api.processes[0].pid)
        for process in master.children():  # gunicorn starts new ones
            process.send_signal(signal.SIGKILL)
        eventually(lambda: len(master.children()) == 2, what="gunicorn replaces its workers")
        eventually(lambda: provider.held(gate) == 1 and len(_runs(client, ref)) == 1, timeout=5)
        provider.open_gate(gate)
        caller.join(60)
    assert answer, "the SDK gave up"
    runs = _runs(client, ref)
    assert len(runs) == 1
    assert answer[0].request_id == runs[0]["request_id"] == answer[0].output.request_id


def test_the_sdk_does_not_retry_a_failed_run(client: Client, provider: StandInProvider) -> None:
    ref, marker = _ref("fails"), uuid.uuid4().hex
    client.upload(ref, FAILS.format(origin=provider.origin))
    sdk = Flowpool(api_key=client.key, base_url=client.base_url)
    with pytest.raises(InternalServerError):
        sdk.workflow.completions.create(model=f"workflow:{ref}", input={"id": marker})
    assert _side_effects(provider, marker) == 1


@pytest.mark.slow
def test_a_request_refused_before_it_ran_may_be_retried_with_its_key() -> None:
    """503 "no worker": nothing ran, x-should-retry says so, and the same key then runs the request."""
    with RedisServer() as server:
        stack = Stack(env=TEST_ENV, redis_url=server.url)
        try:
            stack.start_api(quiet=True)
            assert stack.api_url is not None
            eventually(lambda: _answers(f"{stack.api_url}/healthz"), timeout=60, what="the API answers")
            client = Client(stack.api_url, stack.create_account("retrier"))
            client.upload("echo", "def execute(ctx):\n    return ctx.request_id\n")
            key = f"k-{uuid.uuid4().hex}"
            refused = _invoke(client, "echo", key, input={})
            assert refused.status_code == 503 and refused.headers["x-should-retry"] == "true", refused.text
            stack.start_worker(quiet=True)
            stack.wait_ready(workers=1)
            retried = _invoke(client, "echo", key, input={})
            assert retried.status_code == 200, retried.text
            assert retried.json()["output"] == retried.json()["request_id"]
        finally:
            stack.stop()
