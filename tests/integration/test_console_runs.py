"""The console's runs pages over HTTP on the real stack: the runs list (filters, rows fragment, empty states), a
run's page (timeline of its calls, fallback, output stream in order, error traceback, input/output JSON, live
stream and detail fragment), a session's page, and 404s for runs and sessions of other accounts."""
from __future__ import annotations

import html
import re
import uuid
from typing import Any

import pytest
import requests

from flowpool import keys
from flowpool.devstack import Stack
from tests.helpers import Client, console_session, eventually, sse_events
from tests.provider import StandInProvider

SUCCEEDS = """
    def execute(ctx):
        return {"echo": ctx.input}
"""

FAILS = """
    def execute(ctx):
        return helper(ctx.input)

    def helper(value):
        raise ValueError("boom-" + str(value.get("n")))
"""

# Asks its application's intent (the primary fails, the fallback answers), fetches a document over HTTP, and
# interleaves log lines and chunks.
CALLS_AND_TALKS = """
    APPLICATION = "{app}"

    def execute(ctx):
        ctx.log.info("log-one")
        ctx.emit("text", "chunk-one")
        resp = ctx.chat.completions.create(intent="answer", messages=[{{"role": "user", "content": "hi there"}}])
        ctx.log.info("log-two", step=2)
        ctx.emit("text", "chunk-two")
        ctx.http.get("{origin}/doc/console")
        ctx.log.warning("log-three")
        return {{"answer": resp["choices"][0]["message"]["content"]}}
"""

# Logs and emits, then waits at a gate until the test opens it.
HOLDS = """
    def execute(ctx):
        ctx.log.info("before-gate")
        ctx.emit("text", "tick-0")
        ctx.http.get("{origin}/hold/{gate}")
        ctx.log.info("after-gate")
        ctx.emit("text", "tick-1")
        return "released"
"""


def _ref(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def console(stack: Stack, client: Client) -> requests.Session:
    """The console signed in as ``client``'s account."""
    assert stack.api_url is not None
    return console_session(stack.api_url, client.key)


def _page(console: requests.Session, stack: Stack, path: str, **params: Any) -> str:
    response = console.get(f"{stack.api_url}{path}", params=params, timeout=30)
    assert response.status_code == 200, (response.status_code, response.text[:1000])
    return response.text


def _section(page: str, title_id: str) -> str:
    """The text of the page's <section> whose heading has id ``title_id``."""
    start = page.index(f'id="{title_id}"')
    end = page.find("</section>", start)
    return page[start:end]


def test_runs_page_lists_the_accounts_runs_and_applies_filters(stack: Stack, client: Client,
                                                               console: requests.Session) -> None:
    ok, bad = _ref("ok"), _ref("bad")
    client.upload(ok, SUCCEEDS)
    client.upload(bad, FAILS)
    in_session = _ok(client.invoke(ok, input={"n": 1}, session_id="sess-console-1", cache=False))["request_id"]
    alone = _ok(client.invoke(ok, input={"n": 2}, cache=False))["request_id"]
    failed = client.invoke(bad, input={"n": 3}).headers["X-Request-Id"]

    page = _page(console, stack, "/console/runs")
    for request_id in (in_session, alone, failed):
        assert f'href="/console/runs/{request_id}"' in page
    assert 'href="/console/sessions/sess-console-1"' in page
    assert f'href="/console/workflows/{ok}?version=' in page
    assert f'<option value="{ok}">' in page and f'<option value="{bad}">' in page  # the workflow select
    assert "data-hotkey-focus" in page
    # The first page keeps itself up to date from the rows fragment, with the same filters.
    assert 'hx-get="/console/runs/rows"' in page and 'hx-trigger="every 3s"' in page

    by_status = _page(console, stack, "/console/runs", status="failed")
    assert failed in by_status and in_session not in by_status and alone not in by_status
    assert 'hx-get="/console/runs/rows?status=failed"' in by_status

    by_workflow = _page(console, stack, "/console/runs", workflow=ok)
    assert in_session in by_workflow and alone in by_workflow and failed not in by_workflow

    by_session = _page(console, stack, "/console/runs", session_id="sess-console-1")
    assert in_session in by_session and alone not in by_session and failed not in by_session

    rows = _page(console, stack, "/console/runs/rows", workflow=ok)
    assert "<html" not in rows and rows.count('class="run-row"') == 2
    assert in_session in rows and failed not in rows


def test_runs_page_pages_back_with_an_older_link(stack: Stack, client: Client, console: requests.Session) -> None:
    ref = _ref("many")
    client.upload(ref, SUCCEEDS)
    ids = [_ok(client.invoke(ref, input={"n": n}, cache=False))["request_id"] for n in range(52)]
    first = _page(console, stack, "/console/runs")
    assert first.count('class="run-row"') == 50 and ids[-1] in first and ids[0] not in first
    older = re.search(r'<a rel="next" href="([^"]+)">Older</a>', first)
    assert older, "the first page links to older runs"
    second = _page(console, stack, html.unescape(older.group(1)))
    assert ids[0] in second and ids[1] in second and ids[-1] not in second
    assert 'hx-trigger="every 3s"' not in second  # an older page does not poll
    assert ">Newest</a>" in second


def test_runs_page_says_what_to_do_when_there_are_no_runs(stack: Stack, client: Client,
                                                          console: requests.Session) -> None:
    empty = _page(console, stack, "/console/runs")
    assert "No runs yet" in empty and "flowpool invoke" in empty and 'href="/console/playground"' in empty
    ref = _ref("one")
    client.upload(ref, SUCCEEDS)
    _ok(client.invoke(ref, input={}))
    none_match = _page(console, stack, "/console/runs", status="failed")
    assert "No runs match these filters" in none_match and "No runs yet" not in none_match
    assert '<a href="/console/runs">clear the filters</a>' in none_match


def test_run_page_shows_calls_on_the_timeline_with_the_fallback_and_output_in_order(
        stack: Stack, client: Client, console: requests.Session, provider: StandInProvider) -> None:
    app, ref = _ref("app"), _ref("talks")
    route = {"model": "fail", "base_url": provider.base_url,
             "fallbacks": [{"model": "echo", "base_url": provider.base_url}]}
    put = client.request("PUT", f"/api/v1/applications/{app}", json={"intents": {"answer": route}})
    assert put.status_code == 201, put.text
    client.upload(ref, CALLS_AND_TALKS.format(app=app, origin=provider.origin))
    body = _ok(client.invoke(ref, input={"question": "where-is-<b>-it"}, cache=False))
    request_id = body["request_id"]

    page = _page(console, stack, f"/console/runs/{request_id}")
    timeline = _section(page, "run-timeline-title")
    # One row per call after the run's own row, each a link to its details row.
    labels = re.findall(r'<span class="tl-name">([^<]+)</span>', timeline)
    assert labels[0] == f"run {ref}@{client.run(request_id)['version']}"
    assert labels[1:] == ["model fail", "model echo", f"HTTP GET 127.0.0.1:{provider.port}/doc/console"]
    assert "fallback #1" in timeline and "<svg" in timeline and "<title>" in timeline
    for anchor in (f"call-{request_id}-model-0", f"call-{request_id}-model-1", f"call-{request_id}-http-0"):
        assert f'href="#{anchor}"' in timeline and f'<tr id="{anchor}"' in timeline
    assert "HTTP 500" in timeline  # the failed primary's error in its details

    output = _section(page, "run-output-title")
    order = ["log-one", "chunk-one", "log-two", "chunk-two", "log-three"]
    assert [output.index(text) for text in order] == sorted(output.index(text) for text in order)
    assert "WARNING" in output and '{"step": 2}' in html.unescape(output)

    inputs = _section(page, "run-input-title")
    assert "where-is-&lt;b&gt;-it" in inputs and "<b>" not in inputs  # escaped, in the JSON tree
    result = _section(page, "run-result-title")
    assert "echo: hi there" in result and "json-node" in result
    # An ended run's page neither polls nor follows a stream.
    assert "hx-trigger" not in page and "data-run-stream" not in page
    assert 'style="' not in page  # the CSP blocks style attributes


def test_run_page_shows_a_failed_runs_error_and_the_scripts_traceback(stack: Stack, client: Client,
                                                                      console: requests.Session) -> None:
    ref = _ref("fails")
    client.upload(ref, FAILS)
    request_id = client.invoke(ref, input={"n": 7}).headers["X-Request-Id"]
    page = _page(console, stack, f"/console/runs/{request_id}")
    error = _section(page, "run-error-title")
    assert "boom-7" in error and "ValueError" in error
    traceback = re.search(r'<pre class="traceback">(.*?)</pre>', error, re.S)
    assert traceback and "helper" in traceback.group(1) and "raise ValueError" in html.unescape(traceback.group(1))
    assert 'class="badge badge-failed"' in page


def test_a_live_run_page_follows_the_stream_and_its_detail_stops_polling_at_the_end(
        stack: Stack, client: Client, console: requests.Session, provider: StandInProvider) -> None:
    ref, gate = _ref("holds"), uuid.uuid4().hex
    client.upload(ref, HOLDS.format(origin=provider.origin, gate=gate))
    started = client.post("/api/v1/runs", json={"model": f"workflow:{ref}", "input": {}, "cache": False})
    assert started.status_code == 202, started.text
    request_id = started.json()["request_id"]
    eventually(lambda: provider.held(gate) == 1, timeout=30, what="the run waits at the gate")
    try:
        page = _page(console, stack, f"/console/runs/{request_id}")
        assert f'hx-get="/console/runs/{request_id}/detail" hx-trigger="every 2s"' in page
        stream_url = re.search(r'data-run-stream="([^"]+)"', page)
        assert stream_url and html.unescape(stream_url.group(1)).startswith(f"/console/runs/{request_id}/stream?after=")
        assert "before-gate" in page and "tick-0" in page  # what it sent so far
        detail = console.get(f"{stack.api_url}/console/runs/{request_id}/detail", timeout=30)
        assert detail.status_code == 200 and "<html" not in detail.text and "before-gate" in detail.text

        # From the start, the stream carries what came before the gate too.
        with console.get(f"{stack.api_url}/console/runs/{request_id}/stream", stream=True, timeout=60) as response:
            assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
            events = sse_events(response)
            seen: list[dict[str, Any]] = []
            for event in events:
                seen.append(event)
                if event.get("event") == "log" and event["data"]["msg"] == "before-gate":
                    break
            provider.open_gate(gate)
            seen.extend(events)
    finally:
        provider.open_gate(gate)
    chunks = [e["data"]["content"] for e in seen
              if e["data"] != "[DONE]" and e["data"].get("object") == "workflow.chunk"]
    logs = [e["data"]["msg"] for e in seen if e.get("event") == "log"]
    assert chunks == ["tick-0", "tick-1"] and logs == ["before-gate", "after-gate"]
    assert seen[-1]["data"] == "[DONE]" and seen[-2]["data"]["object"] == "chat.completion"

    def ended() -> requests.Response | None:
        answer = console.get(f"{stack.api_url}/console/runs/{request_id}/detail", timeout=30)
        return answer if answer.status_code == 286 else None

    final = eventually(ended, timeout=30, what="the detail fragment answers 286 once the run ended")
    assert "after-gate" in final.text and "tick-1" in final.text and "released" in final.text

    # Resuming after the page's cursor gives only what came after it.
    with console.get(f"{stack.api_url}/console/runs/{request_id}/stream", params={"after": html.unescape(
            stream_url.group(1)).split("after=", 1)[1]}, stream=True, timeout=60) as response:
        resumed = list(sse_events(response))
    assert [e["data"]["content"] for e in resumed if e["data"] != "[DONE]"
            and e["data"].get("object") == "workflow.chunk"] == ["tick-1"]


def test_an_ended_runs_lines_are_put_among_its_chunks_by_time_once_its_log_stream_is_gone(
        stack: Stack, client: Client, console: requests.Session, stack_db: Any) -> None:
    ref = _ref("quiet")
    client.upload(ref, """
        def execute(ctx):
            ctx.log.info("only-line")
            return "ok"
    """)
    request_id = _ok(client.invoke(ref, input={}, cache=False))["request_id"]
    stack_db.delete(keys.run_logs(request_id))  # as LOG_TAIL_SECONDS after its end
    output = _section(_page(console, stack, f"/console/runs/{request_id}"), "run-output-title")
    assert "only-line" in output and "data-entry" not in output


def test_session_page_shows_all_runs_of_the_session_on_one_timeline(stack: Stack, client: Client,
                                                                    console: requests.Session) -> None:
    ref, session = _ref("sess"), f"s-{uuid.uuid4().hex[:8]}"
    client.upload(ref, SUCCEEDS)
    ids = [_ok(client.invoke(ref, input={"n": n}, session_id=session, cache=False))["request_id"] for n in range(3)]
    other = _ok(client.invoke(ref, input={"n": 9}, cache=False))["request_id"]
    page = _page(console, stack, f"/console/sessions/{session}")
    timeline = _section(page, "session-timeline-title")
    assert timeline.count('class="tl-row tl-run') == 3
    for request_id in ids:
        assert f'href="#run-{request_id}"' in timeline and f'id="run-{request_id}"' in page
        assert f'href="/console/runs/{request_id}"' in page
    assert other not in page

    missing = console.get(f"{stack.api_url}/console/sessions/no-such-{uuid.uuid4().hex[:6]}", timeout=30)
    assert missing.status_code == 404 and "session_id" in missing.text  # the hint


def test_another_accounts_run_is_a_404_on_every_run_route(stack: Stack, client: Client,
                                                          console: requests.Session) -> None:
    assert stack.api_url is not None
    stranger = Client(stack.api_url, stack.create_account(f"test-{uuid.uuid4().hex[:8]}"))
    ref = _ref("theirs")
    stranger.upload(ref, SUCCEEDS)
    theirs = _ok(stranger.invoke(ref, input={}, session_id="their-session"))["request_id"]
    for path in (f"/console/runs/{theirs}", f"/console/runs/{theirs}/detail", f"/console/runs/{theirs}/stream",
                 "/console/runs/req_does_not_exist", "/console/sessions/their-session"):
        response = console.get(f"{stack.api_url}{path}", timeout=30)
        assert response.status_code == 404, (path, response.status_code)
    assert theirs not in _page(console, stack, "/console/runs")
