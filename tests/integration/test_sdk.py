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

import psutil
import pytest
import redis
import requests

import flowpool
from flowpool import sdk
from flowpool.sdk import errors
from flowpool.limits import LimitStore
from flowpool.procs import free_port
from flowpool.registry import Accounts
from flowpool.settings import Settings
from tests.helpers import (ECHO_WORKFLOW, FAILING_WORKFLOW, SLEEPING_WORKFLOW, CannedHTTPServer, Client, SilentServer,
                           eventually)


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _sdk(client: Client, key: str | None = None) -> sdk.Flowpool:
    return flowpool.Flowpool(api_key=key or client.key, base_url=client.base_url, timeout=60, max_retries=0)


# Names.

def test_every_sdk_name_imports_from_flowpool_and_import_flowpool_loads_no_client() -> None:
    code = ("import sys, flowpool\n"
            "assert 'flowpool.sdk' not in sys.modules and 'requests' not in sys.modules, sorted(sys.modules)\n"
            "from flowpool import (Flowpool, APIError, NotFoundError, AuthenticationError, WorkflowTimeoutError,\n"
            "                      InternalServerError, BadRequestError, RateLimitError, ServiceUnavailableError,\n"
            "                      APIConnectionError, APITimeoutError, Maitai)\n"
            "assert 'httpx2' not in sys.modules, 'the sync client loads the async one'\n"
            "from flowpool import AsyncFlowpool, AsyncMaitai\n"
            "import flowpool.sdk as c, flowpool.client as old\n"
            "assert NotFoundError is c.NotFoundError is old.NotFoundError\n"
            "assert issubclass(WorkflowTimeoutError, APIError)\n"
            "assert issubclass(APITimeoutError, APIConnectionError) and issubclass(APIConnectionError, APIError)\n"
            "assert AsyncFlowpool is old.AsyncFlowpool and sorted(old.__all__) == sorted(c.__all__)\n"
            "print(sorted(set(c.__all__) ^ (set(flowpool.__all__) - {'verify_webhook', 'WebhookSignatureError', "
            "'Settings', '__version__'})))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"  # flowpool re-exports every public name of the SDK, and no other


def test_no_public_name_of_the_sdk_shadows_a_builtin() -> None:
    assert set(sdk.__all__) & set(dir(builtins)) == set()
    assert set(flowpool.__all__) & set(dir(builtins)) == set()
    assert errors._ERRORS[408] is flowpool.WorkflowTimeoutError


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


# Transport failures and timeouts: APIConnectionError and APITimeoutError, chained from requests' exceptions.

def test_a_refused_connection_is_an_api_connection_error_chained_from_requests() -> None:
    fp = flowpool.Flowpool(api_key="fp_x", base_url=f"http://127.0.0.1:{free_port()}", max_retries=1)
    with pytest.raises(flowpool.APIConnectionError) as raised:
        fp.workflow.completions.create(model="workflow:echo", input={})
    error = raised.value
    assert type(error) is flowpool.APIConnectionError and isinstance(error, flowpool.APIError)
    assert (error.status_code, error.body, error.request_id) == (None, None, None)
    assert isinstance(error.__cause__, requests.ConnectionError)
    assert repr(pickle.loads(pickle.dumps(error))) == repr(error)


class _TimeoutsSent(requests.Session):
    """A session that keeps the timeout each request was sent with."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[object] = []

    def request(self, *args: object, **kwargs: object) -> requests.Response:  # type: ignore[override]
        self.timeouts.append(kwargs.get("timeout"))
        return super().request(*args, **kwargs)  # type: ignore[arg-type]


def test_a_call_past_its_timeout_is_an_api_timeout_error_whether_the_clients_or_its_own() -> None:
    with SilentServer() as silent, flowpool.Flowpool(api_key="fp_x", base_url=silent.url, timeout=(5, 0.3),
                                                     max_retries=3) as fp:
        fp.session = sent = _TimeoutsSent()
        patient = fp.with_options(timeout=60)
        errors = []
        for call in (lambda: fp.workflows.list(),
                     lambda: patient.workflow.completions.create(model="workflow:x", input={}, timeout=0.3),
                     lambda: patient.workflow.runs.create(model="workflow:x", input={}, timeout=(2, 0.3))):
            with pytest.raises(flowpool.APITimeoutError) as raised:
                call()
            errors.append(raised.value)
    assert all(isinstance(e.__cause__, requests.ReadTimeout) and e.status_code is None for e in errors)
    assert sent.timeouts == [(5, 0.3), 0.3, (2, 0.3)]  # one try each: a read past its time is not sent again


# with_options.

def _connections_to(url: str) -> int:
    port = int(url.rsplit(":", 1)[1])
    return sum(1 for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port
               and c.status == psutil.CONN_ESTABLISHED)


def test_with_options_makes_a_client_of_other_options_on_the_same_session(client: Client) -> None:
    ref = _ref("echo")
    client.upload(ref, ECHO_WORKFLOW)
    before = _connections_to(client.base_url)  # the test's own client keeps one
    with _sdk(client) as fp:
        other = fp.with_options(timeout=5, max_retries=3, default_headers={"X-Trace": "t1"})
        assert other.session is fp.session
        assert (other.timeout, other.max_retries, other.api_key, dict(other.default_headers)) == (
            5, 3, client.key, {"X-Trace": "t1"})
        assert (fp.timeout, fp.max_retries, dict(fp.default_headers)) == (60, 0, {})
        for each in (fp, other, fp, other):
            assert each.workflow.completions.create(model=f"workflow:{ref}", input={"text": "x"}).output.echo == "x"
        assert _connections_to(client.base_url) == before + 1  # one kept-alive connection served both
        with pytest.raises(flowpool.AuthenticationError):
            fp.with_options(api_key="fp_bogus").workflows.list()
        assert fp.workflows.list()  # the key goes with each request, not into the shared session


# Maitai: the seed's name, its variables and its header.

def test_maitai_reads_maitai_variables_first_and_sends_its_key_as_x_maitai_api_key(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWPOOL_API_KEY", "fp_not_this_one")
    monkeypatch.setenv("FLOWPOOL_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MAITAI_API_KEY", client.key)
    monkeypatch.setenv("MAITAI_BASE_URL", client.base_url)
    ref = _ref("echo")
    client.upload(ref, ECHO_WORKFLOW)
    from flowpool import Maitai

    maitai = Maitai()
    assert (maitai.api_key, maitai.base_url) == (client.key, client.base_url)
    assert maitai.workflow.completions.create(model=f"workflow:{ref}", input={"text": "m"}).output.echo == "m"

    with CannedHTTPServer(_answer("200 OK", "application/json", b'{"data": []}')) as server:
        assert Maitai(base_url=server.url).workflows.list() == []
    (head,) = server.heads
    assert f"x-maitai-api-key: {client.key}\r\n".lower() in head.lower() and "\nx-api-key" not in head.lower()

    monkeypatch.delenv("MAITAI_API_KEY")
    monkeypatch.delenv("MAITAI_BASE_URL")
    fallback = Maitai()
    assert (fallback.api_key, fallback.base_url) == ("fp_not_this_one", "http://127.0.0.1:9")
