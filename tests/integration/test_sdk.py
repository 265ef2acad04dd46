"""The Python SDK as a user meets it: its names from ``flowpool``, its errors and how its objects print.

Every error here is a real answer of the session's stack over HTTP.
"""
from __future__ import annotations

import builtins
import pickle
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

import flowpool
from flowpool import client as sdk
from flowpool.limits import LimitStore
from flowpool.registry import Accounts
from flowpool.settings import Settings
from tests.helpers import ECHO_WORKFLOW, FAILING_WORKFLOW, SLEEPING_WORKFLOW, CannedHTTPServer, Client, eventually


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _sdk(client: Client, key: str | None = None) -> sdk.Flowpool:
    return flowpool.Flowpool(api_key=key or client.key, base_url=client.base_url, timeout=60, max_retries=0)


# Names.

def test_every_sdk_name_imports_from_flowpool_and_import_flowpool_loads_no_client() -> None:
    code = ("import sys, flowpool\n"
            "assert 'flowpool.client' not in sys.modules and 'requests' not in sys.modules, sorted(sys.modules)\n"
            "from flowpool import (Flowpool, APIError, NotFoundError, AuthenticationError, WorkflowTimeoutError,\n"
            "                      InternalServerError, BadRequestError, RateLimitError, ServiceUnavailableError)\n"
            "import flowpool.client as c\n"
            "assert NotFoundError is c.NotFoundError and issubclass(WorkflowTimeoutError, APIError)\n"
            "print(sorted(set(c.__all__) - set(flowpool.__all__)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"  # flowpool re-exports every public name of the client


def test_no_public_name_of_the_sdk_shadows_a_builtin() -> None:
    assert set(sdk.__all__) & set(dir(builtins)) == set()
    assert set(flowpool.__all__) & set(dir(builtins)) == set()
    assert sdk._ERRORS[408] is flowpool.WorkflowTimeoutError


# Errors, from real answers.

def test_an_unknown_workflow_is_a_not_found_error_with_status_code_message_and_no_request_id(client: Client) -> None:
    with pytest.raises(flowpool.NotFoundError) as raised:
        _sdk(client).workflow.completions.create(model="workflow:nowhere-to-be-found", input={})
    error = raised.value
    assert error.status_code == error.status == 404
    assert "nowhere-to-be-found" in (error.message or "")
    assert error.request_id is None  # no run was started
    assert error.body["error"]["message"] == error.message and error.headers["Content-Type"] == "application/json"

    with pytest.raises(flowpool.NotFoundError) as missing_run:
        _sdk(client).runs.get("req_doesnotexist")
    assert missing_run.value.status_code == 404 and missing_run.value.request_id is None


def test_a_bad_key_is_an_authentication_error(client: Client) -> None:
    with pytest.raises(flowpool.AuthenticationError) as raised:
        _sdk(client, key="fp_bogus").workflows.list()
    error = raised.value
    assert (error.status_code, error.type, error.request_id) == (401, "authentication_error", None)
    assert error.message
    assert repr(error) == (f"AuthenticationError(status_code=401, type='authentication_error', "
                           f"message={error.message!r}, request_id=None)")


def test_a_failing_workflow_is_an_internal_server_error_naming_its_run(client: Client) -> None:
    ref = _ref("fails")
    client.upload(ref, FAILING_WORKFLOW)
    fp = _sdk(client)
    with pytest.raises(flowpool.InternalServerError) as raised:
        fp.workflow.completions.create(model=f"workflow:{ref}", input={})
    error = raised.value
    assert (error.status_code, error.type) == (500, "script_error")
    assert error.message == "ZeroDivisionError: division by zero"
    assert error.request_id and error.request_id.startswith("req_")
    assert error.request_id == error.headers["X-Request-Id"]
    assert str(error) == f"500 script_error: ZeroDivisionError: division by zero (request_id {error.request_id})"
    assert repr(error) == (f"InternalServerError(status_code=500, type='script_error', "
                           f"message='ZeroDivisionError: division by zero', request_id='{error.request_id}')")
    assert repr(pickle.loads(pickle.dumps(error))) == repr(error)

    run = fp.runs.get(error.request_id)  # the request_id names the run that failed
    assert (run.request_id, run.workflow, run.status) == (error.request_id, ref, "failed")
    assert "line 2, in divide" in run.error["traceback"]

    # A stream that fails after its first chunk ends with the same error, from its error event.
    events = []
    with pytest.raises(flowpool.InternalServerError) as streamed:
        for event in fp.workflow.completions.create(model=f"workflow:{ref}", input={}, stream=True):
            events.append(event)
    assert [(e.object, e.type, e.content) for e in events] == [("workflow.chunk", "step", 1)]
    assert streamed.value.request_id == events[0].request_id != error.request_id
    assert fp.runs.get(streamed.value.request_id).status == "failed"


def test_a_workflow_past_its_time_limit_is_a_workflow_timeout_error_naming_its_run(client: Client) -> None:
    ref = _ref("sleeps")
    client.upload(ref, SLEEPING_WORKFLOW)
    fp = _sdk(client)
    with pytest.raises(flowpool.WorkflowTimeoutError) as raised:
        fp.workflow.completions.create(model=f"workflow:{ref}", input={})
    error = raised.value
    assert (error.status_code, error.type) == (408, "timeout")
    assert "time limit" in (error.message or "")
    assert fp.runs.get(error.request_id).status == "timed_out"


# How objects print.

def test_a_completion_prints_as_its_kind_and_fields_and_keeps_its_access(client: Client) -> None:
    ref = _ref("echo")
    client.upload(ref, ECHO_WORKFLOW)
    fp = _sdk(client)
    response = fp.workflow.completions.create(model=f"workflow:{ref}", input={"text": "hi"})
    shown = repr(response)
    assert shown.startswith(f"ChatCompletion(id='chatcmpl-{response.request_id}', object='chat.completion', ")
    assert f"model='workflow:{ref}'" in shown and "output={'echo': 'hi'}" in shown
    assert str(response) == shown
    assert repr(response.choices[0]).startswith("Choice(index=0, message={'role': 'assistant', ")
    assert repr(response.choices[0].message) == """Message(role='assistant', content='{"echo":"hi"}')"""
    assert repr(response.usage) == "Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)"
    # Attribute and item access, and the raw data, as before.
    assert response.output.echo == response["output"]["echo"] == response.to_dict()["output"]["echo"] == "hi"
    assert "output" in response and "choices" in dir(response)
    with pytest.raises(AttributeError):
        response.no_such_field  # noqa: B018 - the access is the test

    run = fp.runs.get(response.request_id)
    assert repr(run).startswith(f"Run(request_id='{response.request_id}', workflow='{ref}', ")
    (listed,) = fp.workflows.runs(ref)
    assert repr(listed).startswith(f"Run(request_id='{response.request_id}', ")
    assert repr(fp.workflows.get(ref)).startswith("Workflow(")


# An answer that is not the API's: a proxy's page, or JSON of another shape.

def _answer(status: str, content_type: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize("content_type, body", [
    ("text/html", b"<html><body>Signed out: log in at the proxy</body></html>"),
    ("application/json", b'["not", "an", "object"]'),
], ids=["html", "json-list"])
def test_a_success_whose_body_is_not_a_json_object_raises_an_api_error_showing_the_status_and_body(
        content_type: str, body: bytes) -> None:
    with CannedHTTPServer(_answer("200 OK", content_type, body)) as proxy:
        fp = flowpool.Flowpool(api_key="fp_test", base_url=proxy.url, max_retries=0)
        for call in (lambda: fp.workflow.completions.create(model="workflow:echo", input={}),
                     lambda: fp.workflows.get("echo"), lambda: fp.runs.get("req_x")):
            with pytest.raises(flowpool.APIError) as raised:
                call()
            error = raised.value
            assert error.status_code == 200
            assert error.message is not None and f"({content_type})" in error.message
            assert body.decode()[:30] in str(error), str(error)


# A quota's 429, from an account the operator limited to one run at a time.

SLOW_WORKFLOW = """\
import time


def execute(ctx):
    time.sleep(ctx.input["seconds"])
    return ctx.input["seconds"]
"""


def test_a_429_is_a_rate_limit_error_and_the_retries_wait_its_retry_after(client: Client, stack_db: redis.Redis,
                                                                          ) -> None:
    account = Accounts(stack_db).authenticate(client.key)
    LimitStore(stack_db, Settings()).set(account.id, concurrency=1)
    ref = _ref("slow")
    client.upload(ref, SLOW_WORKFLOW)
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(client.invoke, ref, input={"seconds": 3})  # takes the account's one slot
        eventually(lambda: client.get(f"/api/v1/workflows/{ref}/runs").json()["data"], what="the first run")

        with pytest.raises(flowpool.RateLimitError) as raised:
            _sdk(client).workflow.completions.create(model=f"workflow:{ref}", input={"seconds": 0})
        error = raised.value
        assert (error.status_code, error.type) == (429, "rate_limit_exceeded")
        assert "concurrency" in (error.message or "") and error.request_id is None  # nothing was started
        assert error.headers["x-should-retry"] == "true" and int(error.headers["Retry-After"]) >= 1

        # With retries, each 429 is sent again only after its Retry-After, until the slot comes back.
        answers: list[tuple[float, int, str | None]] = []
        fp = flowpool.Flowpool(api_key=client.key, base_url=client.base_url, timeout=60, max_retries=20)
        fp.session.hooks["response"].append(
            lambda response, *args, **kwargs: answers.append(
                (time.monotonic(), response.status_code, response.headers.get("Retry-After"))))
        done = fp.workflow.completions.create(model=f"workflow:{ref}", input={"seconds": 0})
        assert done.output == 0
        assert holder.result().status_code == 200
    assert [status for _, status, _ in answers[:-1]] == [429] * (len(answers) - 1) and answers[-1][1] == 200
    assert len(answers) >= 2  # the first try came while the slot was held
    for (sent_at, _, retry_after), (next_at, _, _) in zip(answers, answers[1:]):
        assert retry_after is not None and next_at - sent_at >= float(retry_after)


def test_a_429_asking_for_a_long_wait_is_raised_at_once_not_retried(client: Client, stack_db: redis.Redis) -> None:
    if 86400 - time.time() % 86400 < 120:  # seconds to the next UTC midnight
        pytest.skip("the daily budget starts again within the test")  # the budget would reset under it
    account = Accounts(stack_db).authenticate(client.key)
    LimitStore(stack_db, Settings()).set(account.id, compute_seconds_per_day=1)
    ref = _ref("slow")
    client.upload(ref, SLOW_WORKFLOW)
    assert client.invoke(ref, input={"seconds": 1.2}).status_code == 200  # spends today's one compute second

    tries: list[int] = []
    fp = flowpool.Flowpool(api_key=client.key, base_url=client.base_url, timeout=60, max_retries=5)
    fp.session.hooks["response"].append(lambda response, *args, **kwargs: tries.append(response.status_code))
    with pytest.raises(flowpool.RateLimitError) as raised:
        fp.workflow.completions.create(model=f"workflow:{ref}", input={"seconds": 0})
    assert tries == [429]  # Retry-After says midnight: trying again within seconds would only be refused
    error = raised.value
    assert int(error.headers["Retry-After"]) > 10 and error.headers["x-should-retry"] == "true"
    assert "compute_seconds_per_day" in (error.message or "")
