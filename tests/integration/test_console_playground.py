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


def _phases(response: requests.Response) -> list[str]:
    """The phases a response's Server-Timing header names, in order."""
    return [part.split(";")[0].strip() for part in response.headers["Server-Timing"].split(",")]


def test_a_playground_run_is_started_by_the_same_steps_as_post_runs(client: Client) -> None:
    ref = _ref("plain")
    client.upload(ref, PLAIN_WORKFLOW)
    played = _start(_console(client), client, workflow=ref, input={"n": 1})
    posted = client.post("/api/v1/runs", json={"model": f"workflow:{ref}", "input": {"n": 2}})

    assert played.status_code == posted.status_code == 202, (played.text, posted.text)
    assert _phases(posted) == ["app", "parse", "begin", "submit"]
    assert _phases(played) == ["app", "begin", "submit"]  # admitted, then handed to the workers, as the API does


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


def _options(page: str) -> list[tuple[str, str]]:
    """The version select's options: (value, label), in order."""
    select = re.search(r'<select id="playground-version"[^>]*>(.*?)</select>', page, re.S)
    assert select, page
    return [(value, html.unescape(label)) for value, label in
            re.findall(r'<option value="([^"]*)">([^<]*)</option>', select.group(1))]


def test_the_version_select_lists_the_active_version_first_then_the_others_newest_first_drafts_marked(
        client: Client, stack: Any) -> None:
    ref, drafty = _ref("plain"), _ref("drafty")
    client.upload(ref, PLAIN_WORKFLOW)
    client.upload(ref, PLAIN_WORKFLOW.replace('"got"', '"second"'))
    client.upload(ref, PLAIN_WORKFLOW.replace('"got"', '"third"'), publish_version=False)
    client.upload(drafty, PLAIN_WORKFLOW, publish_version=False)
    console = _console(client)
    page = console.get(f"{client.base_url}/console/playground?workflow={ref}", timeout=30).text
    # The active one's value is empty: the run takes the active version, as an unpinned API call does.
    expected = [("", "1.1.0 (active)"), ("1.2.0", "1.2.0 (draft)"), ("1.0.0", "1.0.0")]
    assert _options(page) == expected
    assert 'data-versions-url="/console/playground/versions/"' in page
    # What the page's script refills the select with when the workflow changes: the same options, as JSON.
    answer = console.get(f"{client.base_url}/console/playground/versions/{ref}",
                         headers={"Accept": "application/json"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert [(o["value"], o["label"]) for o in answer.json()["data"]] == expected
    assert [(o["active"], o["draft"]) for o in answer.json()["data"]] == [(True, False), (False, True), (False, False)]
    # A workflow of drafts only has no empty choice: a run of it must name a version.
    assert _options(console.get(f"{client.base_url}/console/playground?workflow={drafty}", timeout=30).text) == [
        ("1.0.0", "1.0.0 (draft)")]
    # Another account's workflow is not listed for anyone else.
    other = _console(Client(client.base_url, stack.create_account(f"other-{uuid.uuid4().hex[:6]}")))
    refused = other.get(f"{client.base_url}/console/playground/versions/{ref}",
                        headers={"Accept": "application/json"}, timeout=30)
    assert refused.status_code == 404 and error_of(refused)["reason"] == "workflow_not_found"


def _session_field(page: str) -> str:
    field = re.search(r'<input id="playground-session"[^>]*>', page)
    assert field, page
    return field.group(0)


def test_a_runs_input_opens_in_the_playground_with_its_workflow_and_no_session_id(client: Client, stack: Any) -> None:
    ref, other_ref = _ref("schema"), _ref("plain")
    client.upload(ref, SCHEMA_WORKFLOW)
    client.upload(other_ref, PLAIN_WORKFLOW)
    console = _console(client)
    sent = {"topic": "tides <b>", "weight": 2.5, "tags": ["a"]}
    request_id = _start(console, client, workflow=ref, input=sent, session_id="sess-from").json()["request_id"]
    _end(console, client, request_id)
    # The run page's link names the run's workflow; the run's input fills the textarea, not the example.
    page = console.get(f"{client.base_url}/console/playground",
                       params={"workflow": ref, "from": request_id}, timeout=30).text
    assert json.loads(_textarea(page)) == sent and "&lt;b&gt;" in page
    assert re.search(rf'<option value="{re.escape(ref)}" selected>', page)
    assert '<option value="input" selected>' in page
    assert "value=" not in _session_field(page)  # a new session unless the user names one
    notice = re.search(r'<p class="flash" role="status" id="playground-notice">(.*?)</p>', page, re.S)
    assert notice and f'href="/console/runs/{request_id}"' in notice.group(1)
    assert "its session id is left out" in notice.group(1)
    # A run sent messages comes back as messages.
    said = [{"role": "user", "content": "hello there"}]
    chat_id = _start(console, client, workflow=other_ref, messages=said).json()["request_id"]
    _end(console, client, chat_id)
    chat = console.get(f"{client.base_url}/console/playground",
                       params={"workflow": other_ref, "from": chat_id}, timeout=30).text
    assert json.loads(_textarea(chat)) == said and '<option value="messages" selected>' in chat
    # An unknown id, and another account's run, read the same: the workflow's example and a notice.
    expected = {"topic": "", "count": 0, "tags": [], "loud": False, "extra": {}, "weight": 0}
    unknown = console.get(f"{client.base_url}/console/playground",
                          params={"workflow": ref, "from": "req_nosuchrun"}, timeout=30).text
    assert json.loads(_textarea(unknown)) == expected and "You have no run req_nosuchrun" in unknown
    other = Client(client.base_url, stack.create_account(f"other-{uuid.uuid4().hex[:6]}"))
    theirs = _console(other).get(f"{client.base_url}/console/playground", params={"from": request_id}, timeout=30)
    assert theirs.status_code == 200 and f"You have no run {request_id}" in theirs.text
    assert "tides" not in theirs.text and ref not in theirs.text
