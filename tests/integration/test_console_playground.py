"""The console's playground over HTTP: its form, and runs started through the API's admission."""
from __future__ import annotations

import html
import json
import re
import uuid
from typing import Any

import redis
import requests

from flowpool import keys
from tests.helpers import Client, account_id, console_session, error_of, eventually, sse_events

SCHEMA_WORKFLOW = """
    INPUT_SCHEMA = {
        "topic": {"type": "string", "description": "What to write about"},
        "count": {"type": "integer"},
        "tags": {"type": "array"},
        "loud": {"type": "boolean"},
        "extra": {"type": "object"},
        "weight": {"type": "number", "required": True},
    }

    def execute(ctx):
        ctx.emit("progress", "writing")
        ctx.log.info("wrote", topic=ctx.input.get("topic"))
        return {"topic": ctx.input.get("topic"), "count": ctx.input.get("count"), "session": ctx.session_id}
"""

PLAIN_WORKFLOW = """
    def execute(ctx):
        return {"got": ctx.input, "messages": len(ctx.messages)}
"""


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _console(client: Client) -> requests.Session:
    return console_session(client.base_url, client.key)


def _start(console: requests.Session, client: Client, **body: Any) -> requests.Response:
    return console.post(f"{client.base_url}/console/playground/runs", json=body, timeout=30)


def _end(console: requests.Session, client: Client, request_id: str) -> dict[str, Any]:
    """The run's end as the playground reads it, once it has ended."""
    def ended() -> dict[str, Any] | None:
        response = console.get(f"{client.base_url}/console/playground/runs/{request_id}",
                               headers={"Accept": "application/json"}, timeout=30)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        return data if data["ended"] else None
    return eventually(ended, timeout=30, what=f"run {request_id} to end")


def _textarea(page: str) -> str:
    match = re.search(r'<textarea id="playground-input"[^>]*>(.*?)</textarea>', page, re.S)
    assert match, page
    return html.unescape(match.group(1))


def _choices(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="playground-workflows">(.*?)</script>', page, re.S)
    assert match, page
    return json.loads(match.group(1))


def test_the_form_is_prefilled_with_an_example_input_from_the_input_schema(client: Client) -> None:
    ref, other = _ref("schema"), _ref("plain")
    version = client.upload(ref, SCHEMA_WORKFLOW, description="Writes about a topic")["version"]["version"]
    client.upload(other, PLAIN_WORKFLOW)
    page = _console(client).get(f"{client.base_url}/console/playground?workflow={ref}", timeout=30)
    assert page.status_code == 200 and "<title>Playground" in page.text
    # The registry allows type, description and required; the example follows each field's type.
    expected = {"topic": "", "count": 0, "tags": [], "loud": False, "extra": {}, "weight": 0}
    assert json.loads(_textarea(page.text)) == expected
    assert re.search(rf'<option value="{re.escape(ref)}" selected>', page.text)
    assert "Writes about a topic" in page.text
    # Every workflow's example travels with the page, so switching the select fills the textarea again.
    choices = _choices(page.text)
    assert json.loads(choices[ref]["example"]) == expected and json.loads(choices[other]["example"]) == {}
    assert choices[ref]["active_version"] == version


def test_a_run_started_from_the_playground_is_admitted_like_an_api_run_and_ends(client: Client) -> None:
    ref = _ref("schema")
    client.upload(ref, SCHEMA_WORKFLOW)
    console = _console(client)
    response = _start(console, client, workflow=ref, input={"topic": "tides", "weight": 1.5}, session_id="sess-play")
    assert response.status_code == 202, response.text
    started = response.json()
    request_id = started["request_id"]
    assert request_id.startswith("req_") and response.headers["X-Request-Id"] == request_id
    assert started["run_url"] == f"/console/runs/{request_id}"
    assert started["stream_url"] == f"/console/runs/{request_id}/stream"
    assert started["session_id"] == "sess-play"
    # The stream the page follows: the chunk, the log line, then the answer.
    with console.get(client.base_url + started["stream_url"], stream=True, timeout=30) as stream:
        assert stream.status_code == 200, stream.text
        events = list(sse_events(stream))
    data = [e["data"] for e in events if e["data"] != "[DONE]"]
    assert [d["content"] for d in data if d["object"] == "workflow.chunk"] == ["writing"]
    assert [d["msg"] for d in data if d["object"] == "workflow.log"] == ["wrote"]
    assert events[-2]["data"]["output"]["topic"] == "tides" and events[-1]["data"] == "[DONE]"
    end = _end(console, client, request_id)
    assert end["status"] == "succeeded" and end["error"] is None
    assert end["output"] == {"topic": "tides", "count": None, "session": "sess-play"}
    # The same run as the API shows it: one admission, one record.
    run = client.run(request_id)
    assert run["workflow"] == ref and run["session_id"] == "sess-play" and run["output"] == end["output"]
    # The same request again is answered by the cache at once: 200, with where to look.
    again = _start(console, client, workflow=ref, input={"topic": "tides", "weight": 1.5}, session_id="sess-play")
    assert again.status_code == 200 and again.headers["X-Cache"] == "HIT", again.text
    assert again.json()["run_url"] == f"/console/runs/{again.json()['request_id']}"


def test_a_pinned_version_and_messages_reach_the_run(client: Client) -> None:
    ref = _ref("plain")
    first = client.upload(ref, PLAIN_WORKFLOW)["version"]["version"]
    client.upload(ref, PLAIN_WORKFLOW.replace('"got"', '"second"'))  # now the active version
    console = _console(client)
    response = _start(console, client, workflow=ref, version=first,
                      messages=[{"role": "user", "content": "hello"}])
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    end = _end(console, client, request_id)
    assert end["output"] == {"got": None, "messages": 1}
    assert client.run(request_id)["version"] == first


def test_a_bad_request_is_answered_with_the_apis_error_and_status(client: Client) -> None:
    ref = _ref("schema")
    client.upload(ref, SCHEMA_WORKFLOW)
    console = _console(client)
    url = f"{client.base_url}/console/playground/runs"
    malformed = console.post(url, data="{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert malformed.status_code == 400 and "malformed JSON" in error_of(malformed)["message"]
    nothing = _start(console, client, workflow=ref)
    assert nothing.status_code == 400 and "input" in error_of(nothing)["message"]
    breaks_schema = _start(console, client, workflow=ref, input={"topic": "x"})
    assert breaks_schema.status_code == 400 and "weight" in error_of(breaks_schema)["message"]
    bad_version = _start(console, client, workflow=ref, version="latest", input={"weight": 1})
    assert bad_version.status_code == 400 and error_of(bad_version)["param"] == "version"
    unknown_field = _start(console, client, workflow=ref, input={"weight": 1}, secrets={"k": "v"})
    assert unknown_field.status_code == 400 and "secrets" in error_of(unknown_field)["message"]
    missing = _start(console, client, workflow=_ref("missing"), input={})
    assert missing.status_code == 404 and error_of(missing)["reason"] == "workflow_not_found"
    no_such_version = _start(console, client, workflow=ref, version="9.9.9", input={"weight": 1})
    assert no_such_version.status_code == 404 and error_of(no_such_version)["reason"] == "version_not_found"


def test_over_the_accounts_rate_limit_a_playground_run_is_a_429(client: Client, stack_db: redis.Redis) -> None:
    ref = _ref("plain")
    client.upload(ref, PLAIN_WORKFLOW)
    stack_db.hset(keys.account_limits(account_id(stack_db, client)), mapping={"rpm": 1})
    console = _console(client)
    assert _start(console, client, workflow=ref, input={"n": 1}).status_code == 202
    refused = _start(console, client, workflow=ref, input={"n": 2})
    assert refused.status_code == 429 and "Retry-After" in refused.headers, refused.text


def test_starting_a_run_needs_the_sessions_csrf_token_and_a_same_site_origin(client: Client) -> None:
    ref = _ref("plain")
    client.upload(ref, PLAIN_WORKFLOW)
    console = _console(client)
    url = f"{client.base_url}/console/playground/runs"
    body = {"workflow": ref, "input": {}}
    token = console.headers.pop("X-CSRF-Token")
    assert console.post(url, json=body, timeout=30).status_code == 403
    assert console.post(url, json=body, headers={"X-CSRF-Token": "not-the-token"}, timeout=30).status_code == 403
    cross = console.post(url, json=body, headers={"X-CSRF-Token": token, "Origin": "https://elsewhere.example"},
                         timeout=30)
    assert cross.status_code == 403
    assert console.post(url, json=body, headers={"X-CSRF-Token": token}, timeout=30).status_code == 202


def test_without_a_console_session_the_playground_sends_to_sign_in(client: Client) -> None:
    anonymous = requests.Session()
    page = anonymous.get(f"{client.base_url}/console/playground", allow_redirects=False, timeout=30)
    assert page.status_code == 303 and page.headers["Location"].startswith("/console/sign-in")
    started = anonymous.post(f"{client.base_url}/console/playground/runs", json={"workflow": "x", "input": {}},
                             timeout=30)
    assert started.status_code == 401
    # Nothing reaches the API's own key check either: a key header is no console session.
    keyed = requests.post(f"{client.base_url}/console/playground/runs", json={"workflow": "x", "input": {}},
                          headers={"x-api-key": client.key}, timeout=30)
    assert keyed.status_code == 401


def test_another_accounts_workflow_and_run_are_404(client: Client, stack: Any) -> None:
    ref = _ref("plain")
    client.upload(ref, PLAIN_WORKFLOW)
    mine = _console(client)
    request_id = _start(mine, client, workflow=ref, input={}).json()["request_id"]
    other = Client(client.base_url, stack.create_account(f"other-{uuid.uuid4().hex[:6]}"))
    theirs = _console(other)
    refused = _start(theirs, other, workflow=ref, input={})
    assert refused.status_code == 404, refused.text
    peek = theirs.get(f"{client.base_url}/console/playground/runs/{request_id}",
                      headers={"Accept": "application/json"}, timeout=30)
    assert peek.status_code == 404
    page = theirs.get(f"{client.base_url}/console/playground?workflow={ref}", timeout=30)
    assert ref not in page.text and "No workflows yet" in page.text


def test_an_account_without_workflows_is_told_how_to_upload_one(client: Client) -> None:
    page = _console(client).get(f"{client.base_url}/console/playground", timeout=30)
    assert page.status_code == 200
    assert "No workflows yet" in page.text and "flowpool push workflow.py --name my-workflow" in page.text
    assert 'href="/console/workflows"' in page.text and "<textarea" not in page.text
