"""``POST /workflow/chat/completions`` and the run records, over HTTP against the real stack.

Every test talks to the session's gunicorn API, which hands runs to a real
Celery worker running them in the sandbox. Limits come from ``TEST_ENV``:
1 MiB bodies, 256 KiB inputs and results, 256 MiB of address space per run,
1 s between the soft and the hard time limit.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Any

import pytest
import requests

from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer
from tests.conftest import TEST_ENV
from tests.helpers import Client, error_of, every_value_in

INVOKE = "/workflow/chat/completions"

# Shows what the script received, so tests can check ctx against the request.
CTX_ECHO = """
    from flowpool_workflow import WorkflowContext

    def execute(ctx: WorkflowContext):
        return {"input": ctx.input, "messages": ctx.messages, "session_id": ctx.session_id,
                "request_id": ctx.request_id, "metadata": ctx.metadata, "params": ctx.params}
"""

RETURN_STRING = """
    def execute(ctx):
        return "plain text, " + ctx.input["name"]
"""

# The default: an echo with an INPUT_SCHEMA, as in examples/echo.py.
ECHO = """
    from flowpool_workflow import WorkflowContext

    INPUT_SCHEMA = {
        "text": {"type": "string", "description": "What to echo back", "required": True},
        "times": {"type": "integer"},
    }
    OUTPUT_SCHEMA = {"echo": {"type": "string"}}

    def execute(ctx: WorkflowContext):
        return {"echo": ctx.input["text"] * (ctx.input.get("times") or 1)}
"""

SOFT_LIMIT = """
    import time

    TIMEOUT_SECONDS = 30  # the upload field timeout_seconds wins over this

    def execute(ctx):
        try:
            time.sleep(30)
        finally:
            ctx.log.info("finally ran")
        return {"slept": True}
"""

HARD_LIMIT = """
    import time

    def execute(ctx):
        for _ in range(60):
            try:
                time.sleep(30)
            except BaseException as exc:  # swallows SoftTimeLimitExceeded and keeps going
                ctx.log.warning("ignoring " + type(exc).__name__)
        return {"slept": True}
"""

RAISES = """
    def execute(ctx):
        raise ValueError("boom")
        return {}  # the rules ask for a return statement
"""

BAD_OUTPUT = """
    OUTPUT_SCHEMA = {"answer": {"type": "string", "required": True}, "score": {"type": "number"}}

    def execute(ctx):
        return {"answer": "fine", "score": "high"}
"""

MISSING_OUTPUT = """
    OUTPUT_SCHEMA = {"answer": {"type": "string", "required": True}}

    def execute(ctx):
        return {"other": 1}
"""

BIG_RESULT = """
    def execute(ctx):
        return "x" * ctx.input["size"]
"""

EXIT_HARD = """
    import os

    def execute(ctx):
        os._exit(3)
        return 1
"""

SIGKILL_SELF = """
    import os
    import signal

    def execute(ctx):
        os.kill(os.getpid(), signal.SIGKILL)
        return 1
"""

# Allocates up to 2 GiB in 64 MiB steps, each touched so it is real memory.
MEMORY_BOMB = """
    def execute(ctx):
        hoard = []
        for _ in range(32):
            block = bytearray(64 << 20)
            block[::4096] = b"x" * len(block[::4096])
            hoard.append(block)
        return {"allocated_mib": 64 * len(hoard)}
"""

# Forks up to 200 children that each sleep: bounded, but past the run's process limit.
FORK_LOOP = """
    import os
    import time

    def execute(ctx):
        children = []
        for _ in range(200):
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
        return {"forked": len(children)}
"""

SLEEPS = """
    import time

    def execute(ctx):
        time.sleep(ctx.input["seconds"])
        return {"slept": ctx.input["seconds"]}
"""

VERSIONED = """
    def execute(ctx):
        return {"version": "%s"}
"""

LOGS_AND_CHUNKS = """
    from flowpool_workflow import WorkflowContext

    def execute(ctx: WorkflowContext):
        ctx.log.info("starting", step=1)
        ctx.emit("progress", "half way")
        ctx.emit("progress", {"done": 2})
        ctx.log.warning("almost done")
        print("from print")
        return {"ok": True}
"""

LEAKS_SECRET = """
    def execute(ctx):
        token = ctx.secrets["api_token"]
        ctx.log.info("calling with " + token, token=token)
        ctx.emit("debug", "token=" + token)
        raise RuntimeError("upstream refused token " + token)
        return {}
"""

RETURNS_SECRET = """
    def execute(ctx):
        token = ctx.secrets["api_token"]
        ctx.log.info("token is " + token)
        return {"seen": token}
"""


SWALLOWS_SOFT_LIMIT = """
    import time

    def execute(ctx):
        try:
            time.sleep(30)
        except Exception:
            pass  # returns a value after the soft limit, as if nothing happened
        return {"finished": True}
"""

NOT_JSON_RESULT = """
    def execute(ctx):
        return {"a set": {1, 2}}
"""

SHOWS_ENV = """
    import os

    def execute(ctx):
        return {"ctx_env": ctx.env, "os_environ": dict(os.environ)}
"""

# Connects to the Redis the stack runs on: everything of every account is there.
REACHES_REDIS = """
    import socket

    def execute(ctx):
        try:
            with socket.create_connection(("127.0.0.1", ctx.input["port"]), timeout=2) as sock:
                sock.sendall(b"PING\\r\\n")
                return {"reached": True, "answer": sock.recv(64).decode()}
        except OSError as exc:  # no socket at all (seccomp), or nothing to reach (an empty network)
            return {"reached": False, "error": str(exc)}
"""

IMPORTS_STDLIB = """
    import csv
    import decimal
    import statistics

    def execute(ctx):
        return {"mean": statistics.mean([1, 2, 3]), "dialects": len(csv.list_dialects()),
                "sum": str(decimal.Decimal("0.1") + decimal.Decimal("0.2"))}
"""


def _ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def _ref(name: str) -> str:
    """A workflow ref unique to this test run, so reruns on a shared Redis never collide."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def other(stack: Stack) -> Client:
    """A second account on the same stack."""
    assert stack.api_url is not None
    return Client(stack.api_url, stack.create_account(f"other-{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def ctx_echo(client: Client) -> str:
    ref = _ref("ctx-echo")
    client.upload(ref, CTX_ECHO)
    return ref


@pytest.fixture
def echo(client: Client) -> str:
    ref = _ref("echo")
    client.upload(ref, ECHO)
    return ref


# The happy path: what the script sees and what the caller gets back.


def test_messages_reach_ctx_messages_and_input_is_none(client: Client, ctx_echo: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    output = _ok(client.invoke(ctx_echo, messages=messages))["output"]
    assert output["messages"] == messages
    assert output["input"] is None


def test_input_reaches_ctx_input_and_messages_is_empty(client: Client, ctx_echo: str) -> None:
    payload = {"query": "x", "n": [1, 2.5, None, True], "nested": {"a": {"b": "c"}}}
    output = _ok(client.invoke(ctx_echo, input=payload))["output"]
    assert output["input"] == payload
    assert output["messages"] == []


def test_input_and_messages_together_reach_the_script(client: Client, ctx_echo: str) -> None:
    messages = [{"role": "user", "content": "question"}]
    output = _ok(client.invoke(ctx_echo, input="just a string", messages=messages,
                               metadata={"team": "qa"}, max_tokens=50, temperature=0.5))["output"]
    assert output["input"] == "just a string"
    assert output["messages"] == messages
    assert output["metadata"] == {"team": "qa"}
    assert output["params"]["max_tokens"] == 50
    assert output["params"]["temperature"] == 0.5


def test_response_is_an_openai_chat_completion(client: Client, ctx_echo: str) -> None:
    response = client.invoke(ctx_echo, input={"q": 1})
    body = _ok(response)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == f"workflow:{ctx_echo}"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    assert set(body["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert all(isinstance(v, int) for v in body["usage"].values())
    # flowpool's own fields, consistent with what the script saw
    assert body["output"]["request_id"] == body["request_id"]
    assert body["output"]["session_id"] == body["session_id"]
    assert body["session_id"]
    assert json.loads(choice["message"]["content"]) == body["output"]
    assert response.headers["X-Request-Id"] == body["request_id"]
    assert response.headers["X-Cache"] == "MISS"


def test_session_id_is_the_callers_when_given(client: Client, ctx_echo: str) -> None:
    body = _ok(client.invoke(ctx_echo, input={"q": 2}, session_id="caller-session-7"))
    assert body["session_id"] == "caller-session-7"
    assert body["output"]["session_id"] == "caller-session-7"


def test_each_request_gets_its_own_request_and_session_ids(client: Client, ctx_echo: str) -> None:
    first = _ok(client.invoke(ctx_echo, input={"q": "a"}))
    second = _ok(client.invoke(ctx_echo, input={"q": "b"}))
    assert first["request_id"] != second["request_id"]
    assert first["session_id"] != second["session_id"]


def test_content_is_the_json_text_of_a_dict_output(client: Client, echo: str) -> None:
    body = _ok(client.invoke(echo, input={"text": "ab", "times": 2}))
    assert body["output"] == {"echo": "abab"}
    assert json.loads(body["choices"][0]["message"]["content"]) == {"echo": "abab"}


def test_content_is_the_string_itself_when_output_is_a_str(client: Client) -> None:
    ref = _ref("string-out")
    client.upload(ref, RETURN_STRING)
    body = _ok(client.invoke(ref, input={"name": "ada"}))
    assert body["output"] == "plain text, ada"
    assert body["choices"][0]["message"]["content"] == "plain text, ada"


def test_identical_request_is_a_cache_hit_with_the_same_answer(client: Client, echo: str) -> None:
    first = client.invoke(echo, input={"text": "cache me"})
    second = client.invoke(echo, input={"text": "cache me"})
    assert first.headers["X-Cache"] == "MISS"
    assert second.headers["X-Cache"] == "HIT"
    assert _ok(second)["output"] == _ok(first)["output"]
    assert second.headers["X-Request-Id"] == _ok(second)["request_id"] != _ok(first)["request_id"]
    assert client.run(_ok(second)["request_id"])["cache_hit"] is True


def test_bearer_authorization_works_like_x_api_key(client: Client, echo: str) -> None:
    response = requests.post(client.base_url + INVOKE, timeout=60,
                             headers={"Authorization": f"Bearer {client.key}"},
                             json={"model": f"workflow:{echo}", "input": {"text": "bearer"}})
    assert _ok(response)["output"] == {"echo": "bearer"}


def test_unknown_body_fields_are_ignored(client: Client, echo: str) -> None:
    response = client.invoke(echo, input={"text": "extra"}, top_p=0.3, user="someone", tools=[], n=1,
                             response_format={"type": "json_object"})
    assert _ok(response)["output"] == {"echo": "extra"}


# 400


def test_malformed_json_is_400(client: Client) -> None:
    response = client.post(INVOKE, data=b'{"model": "workflow:x", "input": ',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


def test_empty_body_is_400(client: Client) -> None:
    response = client.post(INVOKE, data=b"", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "empty" in error_of(response)["message"]


def test_json_that_is_not_an_object_is_400(client: Client) -> None:
    response = client.post(INVOKE, json=[{"model": "workflow:x"}])
    assert response.status_code == 400
    error_of(response)


def test_missing_both_input_and_messages_is_400(client: Client, echo: str) -> None:
    response = client.post(INVOKE, json={"model": f"workflow:{echo}"})
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert "input" in message and "messages" in message


@pytest.mark.parametrize("model", ["gpt-4", "workflow:", "workflow:x@1.2", "workflow:x@latest", "workflow:-x",
                                   "workflow:a b", "", "Workflow:x"])
def test_bad_model_format_is_400(client: Client, model: str) -> None:
    response = client.post(INVOKE, json={"model": model, "input": {}})
    assert response.status_code == 400, response.text
    assert "model" in error_of(response)["message"]


def test_missing_model_is_400(client: Client) -> None:
    response = client.post(INVOKE, json={"input": {}})
    assert response.status_code == 400
    assert "model" in error_of(response)["message"]


def test_input_missing_a_required_field_is_400_naming_it(client: Client, echo: str) -> None:
    response = client.invoke(echo, input={"times": 2})
    assert response.status_code == 400
    assert "'text'" in error_of(response)["message"]


def test_input_field_of_the_wrong_type_is_400_naming_it(client: Client, echo: str) -> None:
    response = client.invoke(echo, input={"text": "ok", "times": "twice"})
    assert response.status_code == 400
    error = error_of(response)
    assert "'times'" in error["message"] and "integer" in error["message"]


def test_input_that_is_not_an_object_breaks_the_schema_with_400(client: Client, echo: str) -> None:
    response = client.invoke(echo, input="just text")
    assert response.status_code == 400
    assert "text" in error_of(response)["message"]


@pytest.mark.parametrize("field, value", [("messages", "hello"), ("messages", [{"content": "no role"}]),
                                          ("secrets", {"token": 42}), ("secrets", ["a"]), ("metadata", "x"),
                                          ("temperature", 5), ("max_tokens", 0), ("session_id", 7)])
def test_body_field_of_the_wrong_shape_is_400_naming_it(client: Client, echo: str, field: str, value: Any) -> None:
    body = {"model": f"workflow:{echo}", "input": {"text": "x"}, field: value}
    response = client.post(INVOKE, json=body)
    assert response.status_code == 400, response.text
    assert field in error_of(response)["message"]


def test_only_messages_to_a_workflow_requiring_input_is_400(client: Client, echo: str) -> None:
    response = client.invoke(echo, messages=[{"role": "user", "content": "hi"}])
    assert response.status_code == 400
    assert "'text'" in error_of(response)["message"]


# 401


def test_missing_api_key_is_401(stack: Stack, echo: str) -> None:
    response = requests.post(stack.api_url + INVOKE, json={"model": f"workflow:{echo}", "input": {"text": "x"}},
                             timeout=30)
    assert response.status_code == 401
    assert error_of(response)["type"] == "authentication_error"


@pytest.mark.parametrize("headers", [{"x-api-key": "fp_not_a_real_key"},
                                     {"Authorization": "Bearer fp_not_a_real_key"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}])
def test_unknown_api_key_is_401(stack: Stack, echo: str, headers: dict[str, str]) -> None:
    response = requests.post(stack.api_url + INVOKE, headers=headers, timeout=30,
                             json={"model": f"workflow:{echo}", "input": {"text": "x"}})
    assert response.status_code == 401
    assert error_of(response)["type"] == "authentication_error"


# 404


def test_unknown_workflow_is_404(client: Client) -> None:
    response = client.invoke("no-such-workflow", input={})
    assert response.status_code == 404
    assert error_of(response)["type"] == "invalid_request_error"


def test_another_accounts_workflow_is_404_like_an_unknown_one(client: Client, other: Client, echo: str) -> None:
    theirs = other.invoke(echo, input={"text": "x"})
    unknown = other.invoke("z" * len(echo), input={"text": "x"})
    assert theirs.status_code == unknown.status_code == 404
    theirs_error, unknown_error = error_of(theirs), error_of(unknown)
    assert theirs_error["message"].replace(echo, "<ref>") == unknown_error["message"].replace("z" * len(echo), "<ref>")
    assert {k: v for k, v in theirs_error.items() if k != "message"} == \
        {k: v for k, v in unknown_error.items() if k != "message"}


def test_unknown_pinned_version_is_404(client: Client, echo: str) -> None:
    response = client.invoke(echo, model=f"workflow:{echo}@9.9.9", input={"text": "x"})
    assert response.status_code == 404
    assert "9.9.9" in error_of(response)["message"]


# 408


def _timed_out_run(client: Client, name: str, script: str) -> dict[str, Any]:
    """Upload ``script`` with a 1 s limit and invoke it: the 408 and the timed-out run it recorded."""
    ref = _ref(name)
    client.upload(ref, script, timeout_seconds=1)
    response = client.invoke(ref, input={})
    assert response.status_code == 408, response.text
    error = error_of(response)
    assert error["type"] == "timeout"
    run = client.run(error["request_id"])
    assert run["status"] == "timed_out"
    return run


def test_soft_limit_returns_408_and_runs_finally(client: Client) -> None:
    run = _timed_out_run(client, "soft", SOFT_LIMIT)
    assert run["error"]["limit"] == "soft"
    assert [line["msg"] for line in run["logs"]] == ["finally ran"]


def test_hard_limit_returns_408_when_the_script_ignores_the_soft_one(client: Client) -> None:
    run = _timed_out_run(client, "hard", HARD_LIMIT)
    assert run["error"]["limit"] == "hard"
    assert "ignoring SoftTimeLimitExceeded" in [line["msg"] for line in run["logs"]]


def test_script_that_swallows_the_soft_limit_and_returns_late_is_still_408(client: Client) -> None:
    ref = _ref("swallows")
    client.upload(ref, SWALLOWS_SOFT_LIMIT, timeout_seconds=1)
    response = client.invoke(ref, input={})
    assert response.status_code == 408, response.text
    assert client.run(error_of(response)["request_id"])["status"] == "timed_out"


# 413


def test_body_over_the_limit_is_413(client: Client, echo: str) -> None:
    body = json.dumps({"model": f"workflow:{echo}", "input": {"text": "x" * (1 << 20)}})
    response = client.post(INVOKE, data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert error_of(response)["type"] == "payload_too_large"


def test_input_over_the_limit_is_413(client: Client, echo: str) -> None:
    response = client.invoke(echo, input={"text": "x" * (300 << 10)})
    assert response.status_code == 413
    assert error_of(response)["type"] == "payload_too_large"


def test_messages_over_the_input_limit_are_413(client: Client, ctx_echo: str) -> None:
    response = client.invoke(ctx_echo, messages=[{"role": "user", "content": "y" * (300 << 10)}])
    assert response.status_code == 413
    error_of(response)


@pytest.mark.parametrize("size", [300 << 10, 4 << 20], ids=["just-over", "far-over"])
def test_result_over_the_limit_is_413(client: Client, size: int) -> None:
    ref = _ref("big-result")
    client.upload(ref, BIG_RESULT)
    response = client.invoke(ref, input={"size": size})
    assert response.status_code == 413, response.text[:500]
    error = error_of(response)
    assert error["type"] == "payload_too_large"
    assert client.run(error["request_id"])["status"] == "failed"


def test_result_just_under_the_limit_is_returned(client: Client) -> None:
    ref = _ref("under-limit")
    client.upload(ref, BIG_RESULT)
    body = _ok(client.invoke(ref, input={"size": 200 << 10}))
    assert len(body["output"]) == 200 << 10


# 500


def test_script_exception_is_500_with_its_type_and_message(client: Client) -> None:
    ref = _ref("raises")
    client.upload(ref, RAISES)
    response = client.invoke(ref, input={})
    assert response.status_code == 500
    error = error_of(response)
    assert error["type"] == "script_error"
    assert "ValueError" in error["message"] and "boom" in error["message"]
    run = client.run(error["request_id"])
    assert run["status"] == "failed"
    assert "ValueError" in run["error"]["message"]
    assert 'line 3, in execute' in run["error"]["traceback"]
    assert run["error"]["traceback"].rstrip().endswith("ValueError: boom")


def test_output_schema_type_mismatch_is_500_naming_the_field(client: Client) -> None:
    ref = _ref("bad-output")
    client.upload(ref, BAD_OUTPUT)
    response = client.invoke(ref, input={})
    assert response.status_code == 500
    error = error_of(response)
    assert error["type"] == "output_schema_error"
    assert "'score'" in error["message"]


def test_output_missing_a_required_field_is_500_naming_it(client: Client) -> None:
    ref = _ref("missing-output")
    client.upload(ref, MISSING_OUTPUT)
    response = client.invoke(ref, input={})
    assert response.status_code == 500
    error = error_of(response)
    assert error["type"] == "output_schema_error"
    assert "'answer'" in error["message"]


@pytest.mark.parametrize("script, says", [(EXIT_HARD, "code 3"), (SIGKILL_SELF, "SIGKILL")],
                         ids=["os._exit", "sigkill-self"])
def test_sandbox_crash_is_500_sandbox_error(client: Client, script: str, says: str) -> None:
    ref = _ref("crash")
    client.upload(ref, script)
    response = client.invoke(ref, input={})
    assert response.status_code == 500, response.text
    error = error_of(response)
    assert error["type"] == "sandbox_error"
    assert says in error["message"]
    assert client.run(error["request_id"])["status"] == "failed"


def test_result_that_is_not_json_serializable_is_500(client: Client) -> None:
    ref = _ref("not-json")
    client.upload(ref, NOT_JSON_RESULT)
    response = client.invoke(ref, input={})
    assert response.status_code == 500
    assert "JSON" in error_of(response)["message"]


# Containment through the whole stack


def _worker_still_serves(client: Client, echo: str) -> None:
    body = _ok(client.invoke(echo, input={"text": uuid.uuid4().hex}, cache=False))
    assert body["output"]["echo"]


def test_memory_bomb_fails_and_the_worker_serves_the_next_invoke(client: Client, echo: str) -> None:
    ref = _ref("memory-bomb")
    client.upload(ref, MEMORY_BOMB)
    response = client.invoke(ref, input={})
    assert response.status_code == 500, response.text
    error = error_of(response)
    assert error["type"] in ("script_error", "sandbox_error")
    if error["type"] == "script_error":
        assert "MemoryError" in error["message"]
    _worker_still_serves(client, echo)


@pytest.mark.skipif(os.geteuid() != 0, reason="a per-run process limit needs workers running as root (uid per slot)")
def test_fork_loop_fails_and_the_worker_serves_the_next_invoke(client: Client, echo: str) -> None:
    ref = _ref("fork-loop")
    client.upload(ref, FORK_LOOP, timeout_seconds=10)
    response = client.invoke(ref, input={})
    assert response.status_code == 500, response.text
    error = error_of(response)
    assert error["type"] == "script_error"
    assert "BlockingIOError" in error["message"] or "Resource temporarily unavailable" in error["message"]
    _worker_still_serves(client, echo)


def test_script_sees_its_env_and_nothing_of_the_workers(client: Client) -> None:
    ref = _ref("env")
    client.upload(ref, SHOWS_ENV, env={"MODE": "fast", "REGION": "eu"})
    output = _ok(client.invoke(ref, input={}))["output"]
    assert output["ctx_env"] == {"MODE": "fast", "REGION": "eu"}
    assert output["os_environ"]["MODE"] == "fast" and output["os_environ"]["REGION"] == "eu"
    assert not [name for name in output["os_environ"] if name.startswith(("FLOWPOOL_", "CELERY", "REDIS"))]


def test_script_can_import_the_standard_library(client: Client) -> None:
    ref = _ref("stdlib")
    client.upload(ref, IMPORTS_STDLIB)
    output = _ok(client.invoke(ref, input={}))["output"]
    assert output == {"mean": 2, "dialects": output["dialects"], "sum": "0.3"}


def test_script_cannot_reach_the_network(client: Client, redis_server: RedisServer) -> None:
    ref = _ref("network")
    client.upload(ref, REACHES_REDIS)
    output = _ok(client.invoke(ref, input={"port": redis_server.port}))["output"]
    assert output["reached"] is False, output


def test_runs_of_two_workers_on_one_host_never_kill_each_other(client: Client) -> None:
    """A run's leftovers are killed by uid, so a second worker on the host must use other uids."""
    ref = _ref("long-run")
    client.upload(ref, SLEEPS)
    neighbour = Stack(env=dict(TEST_ENV, FLOWPOOL_WORKER_CONCURRENCY="4"))
    try:
        neighbour.start_worker(quiet=True)
        neighbour.start_api(quiet=True)
        neighbour.wait_ready()
        assert neighbour.api_url is not None
        other_worker = Client(neighbour.api_url, neighbour.create_account("neighbour"))
        other_worker.upload("short", "def execute(ctx):\n    return {'n': ctx.input['n']}\n")
        result: dict[str, requests.Response] = {}
        long_run = threading.Thread(target=lambda: result.update(r=client.invoke(ref, input={"seconds": 2})))
        long_run.start()
        try:
            _wait_until_running(client, ref)
            for n in range(3):  # each run starts and is cleaned up on the neighbour's slots
                assert _ok(other_worker.invoke("short", input={"n": n}))["output"] == {"n": n}
        finally:
            long_run.join(60)
        assert _ok(result["r"])["output"] == {"slept": 2}
    finally:
        neighbour.stop()


def _wait_until_running(client: Client, ref: str) -> None:
    for _ in range(200):
        runs = client.get(f"/api/v1/workflows/{ref}/runs").json()["data"]
        if runs and runs[0]["status"] == "running":
            return
        time.sleep(0.05)
    raise AssertionError(f"the run of {ref} never started")


# Versions


def test_pinned_version_runs_that_version_after_a_newer_upload(client: Client) -> None:
    ref = _ref("pinned")
    assert client.upload(ref, VERSIONED % "one")["version"]["version"] == "1.0.0"
    assert client.upload(ref, VERSIONED % "two")["version"]["version"] == "1.1.0"
    assert _ok(client.invoke(ref, input={}))["output"] == {"version": "two"}
    pinned = _ok(client.invoke(ref, model=f"workflow:{ref}@1.0.0", input={}))
    assert pinned["output"] == {"version": "one"}
    assert pinned["model"] == f"workflow:{ref}@1.0.0"
    assert client.run(pinned["request_id"])["version"] == "1.0.0"
    assert _ok(client.invoke(ref, model=f"workflow:{ref}@1.1.0", input={}))["output"] == {"version": "two"}


# Run records


def test_run_record_shows_status_version_timings_worker_logs_and_chunks(client: Client) -> None:
    ref = _ref("logs")
    client.upload(ref, LOGS_AND_CHUNKS)
    body = _ok(client.invoke(ref, input={}, session_id="sess-run-record", metadata={"k": "v"}))
    run = client.run(body["request_id"])
    assert run["request_id"] == body["request_id"]
    assert run["workflow"] == ref
    assert run["status"] == "succeeded"
    assert run["version"] == "1.0.0"
    assert run["session_id"] == "sess-run-record"
    assert run["cache_hit"] is False
    assert run["worker"]
    assert run["error"] is None
    assert run["output"] == {"ok": True}
    assert run["metadata"] == {"k": "v"}
    timings = run["timings"]
    assert timings["queued_at"] <= timings["started_at"] <= timings["finished_at"]
    assert timings["queue_ms"] >= 0 and timings["run_ms"] >= 0
    logs = [(line["level"], line["msg"]) for line in run["logs"]]
    assert logs == [("info", "starting"), ("warning", "almost done"), ("info", "from print")]
    assert run["logs"][0]["fields"] == {"step": 1}
    assert [(c["type"], c["content"]) for c in run["chunks"]] == [("progress", "half way"),
                                                                   ("progress", {"done": 2})]


def test_run_record_of_a_failed_run_carries_the_error(client: Client) -> None:
    ref = _ref("failed-record")
    client.upload(ref, RAISES)
    error = error_of(client.invoke(ref, input={}))
    run = client.run(error["request_id"])
    assert run["status"] == "failed"
    assert run["error"]["kind"] == "ScriptError"
    assert run["error"]["exception"] == "ValueError"
    assert run["timings"]["finished_at"] is not None


def test_secrets_never_reach_the_run_record_or_redis(client: Client, redis_server: RedisServer) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    ref = _ref("leaky")
    client.upload(ref, LEAKS_SECRET)
    response = client.invoke(ref, input={}, secrets={"api_token": secret})
    assert response.status_code == 500
    error = error_of(response)
    assert "RuntimeError" in error["message"]
    run = client.run(error["request_id"])
    stored = json.dumps(run)
    assert secret not in stored
    assert "[redacted]" in run["error"]["message"]
    assert "[redacted]" in run["logs"][0]["msg"]
    assert run["logs"][0]["fields"] == {"token": "[redacted]"}
    assert run["chunks"] == [{"type": "debug", "content": "token=[redacted]"}]
    assert secret not in response.text
    runs = client.get(f"/api/v1/workflows/{ref}/runs")
    assert secret not in runs.text
    assert not [value for value in every_value_in(redis_server) if secret.encode() in value]


def test_output_carrying_a_secret_is_redacted_in_the_run_record(client: Client) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    ref = _ref("returns-secret")
    client.upload(ref, RETURNS_SECRET)
    first = client.invoke(ref, input={}, secrets={"api_token": secret})
    assert _ok(first)["output"] == {"seen": secret}  # the caller gets its own secret back
    run = client.run(_ok(first)["request_id"])
    assert secret not in json.dumps(run)
    assert run["output"] == {"seen": "[redacted]"}
    assert run["logs"][0]["msg"] == "token is [redacted]"


def test_another_account_cannot_read_a_run(client: Client, other: Client, echo: str) -> None:
    request_id = _ok(client.invoke(echo, input={"text": "private"}))["request_id"]
    theirs = other.get(f"/api/v1/runs/{request_id}")
    unknown = other.get("/api/v1/runs/req_doesnotexist")
    assert theirs.status_code == unknown.status_code == 404
    assert error_of(theirs)["type"] == error_of(unknown)["type"] == "not_found"
    assert "private" not in theirs.text
    assert other.get(f"/api/v1/workflows/{echo}/runs").status_code == 404


def test_unknown_run_is_404(client: Client) -> None:
    response = client.get("/api/v1/runs/req_0000")
    assert response.status_code == 404
    error_of(response)


def test_workflow_runs_are_listed_newest_first_with_pagination(client: Client, echo: str) -> None:
    ids = [_ok(client.invoke(echo, input={"text": f"run {i}"}))["request_id"] for i in range(3)]
    first = client.get(f"/api/v1/workflows/{echo}/runs", params={"limit": 2})
    assert first.status_code == 200, first.text
    page = first.json()
    assert page["pagination"] == {"total": 3, "offset": 0, "limit": 2}
    assert [r["request_id"] for r in page["data"]] == [ids[2], ids[1]]
    assert all(r["status"] == "succeeded" and r["version"] == "1.0.0" for r in page["data"])
    assert all(r["workflow"] == echo for r in page["data"])
    rest = client.get(f"/api/v1/workflows/{echo}/runs", params={"offset": 2, "limit": 2}).json()
    assert rest["pagination"] == {"total": 3, "offset": 2, "limit": 2}
    assert [r["request_id"] for r in rest["data"]] == [ids[0]]
    default = client.get(f"/api/v1/workflows/{echo}/runs").json()
    assert default["pagination"] == {"total": 3, "offset": 0, "limit": 25}
    assert [r["request_id"] for r in default["data"]] == ids[::-1]


def test_workflow_runs_page_arguments_are_checked(client: Client, echo: str) -> None:
    for params in ({"limit": 101}, {"offset": -1}, {"limit": 0}, {"limit": "ten"}):
        response = client.get(f"/api/v1/workflows/{echo}/runs", params=params)
        assert response.status_code == 400, params
        error_of(response)


def test_scripts_written_for_maitai_workflow_run_unchanged(client: Client) -> None:
    ref = _ref("maitai")
    client.upload(ref, """
        from maitai_workflow import WorkflowContext
        import flowpool_workflow

        def execute(ctx: WorkflowContext):
            return {"same_class": WorkflowContext is flowpool_workflow.WorkflowContext,
                    "is_ctx": isinstance(ctx, WorkflowContext)}
    """)
    assert _ok(client.invoke(ref, input={}))["output"] == {"same_class": True, "is_ctx": True}
