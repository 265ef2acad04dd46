"""The console's runs pages over HTTP on the real stack: the runs list (filters, rows fragment and its 204 when
nothing changed, empty states, "Go to run"), a run's page (timeline of its calls, fallback, output stream in order
and capped, error traceback, input/output JSON, live stream and detail fragment), a session's page (live while a
run of it goes), and 404 pages for runs and sessions of other accounts."""
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


def test_an_until_that_is_no_time_is_ignored_as_the_api_would_refuse_it(stack: Stack, client: Client,
                                                                       console: requests.Session) -> None:
    ref = _ref("until")
    client.upload(ref, SUCCEEDS)
    request_id = _ok(client.invoke(ref, input={}))["request_id"]
    for until in ("nan", "inf", "-inf", "-1", "not a time"):
        for path in ("/console/runs", "/console/runs/rows"):
            page = _page(console, stack, path, until=until)
            assert request_id in page and ">Newest</a>" not in page, (path, until)  # the first page
    # An ISO time the API takes is a cursor here too: nothing was queued before 2001.
    assert request_id not in _page(console, stack, "/console/runs", until="2001-01-01T00:00:00Z")


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
    # The bars are hidden from screen readers: a row's link is named by its text alone (no title, no aria-label).
    bars = re.findall(r'<svg class="tl-bar"[^>]*>', timeline)
    assert len(bars) == 4 and all('aria-hidden="true"' in bar and "aria-label" not in bar for bar in bars)
    assert len(re.findall(r'<a class="tl-link" href="[^"]*">', timeline)) == 4
    # The axis's ticks are HTML text, placed by a class (the CSP allows no style attribute), the first at 0.
    assert '<span class="tl-tick tl-at-0 tl-tick-start">0</span>' in timeline and "<text" not in timeline
    legend = re.search(r'<p class="tl-legend muted">(.*?)</p>', timeline, re.S)
    assert legend and [k.strip() for k in re.split(r"<span[^>]*></span>", legend.group(1)) if k.strip()] == [
        "queued", "running", "ran", "failed", "model call", "HTTP call", "workflow call", "in progress",
        "first token"]
    # A table's times are compact (no zone's name in each cell): the column's header says the zone once.
    assert 'data-local="compact-time"' in timeline and "Started <span class=\"zone-name\" data-local-zone>" in timeline
    # The page's own actions: copy the id, and open the playground with this run's workflow and input.
    assert f'data-copy="{request_id}"' in page
    assert f'href="/console/playground?workflow={ref}&amp;from={request_id}">Open in Playground with this input</a>' \
        in page

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
        assert f'hx-get="/console/runs/{request_id}/detail" hx-trigger="every 2s, run-ended"' in page
        stream_url = re.search(r'data-run-stream="([^"]+)"', page)
        assert stream_url and html.unescape(stream_url.group(1)).startswith(f"/console/runs/{request_id}/stream?after=")
        output = _section(page, "run-output-title")
        assert "before-gate" in output and "tick-0" in output and "data-tail" in output  # what it sent so far
        # The polled part is the header, timeline and calls: the output list is the stream's, outside it.
        polled = page[page.index('<div id="run-detail"'):page.index('<section class="run-output"')]
        assert "live-dot" in polled and "run-timeline-title" in polled and "tick-0" not in polled
        detail = console.get(f"{stack.api_url}/console/runs/{request_id}/detail", timeout=30)
        assert detail.status_code == 200 and "<html" not in detail.text and "run-timeline-title" in detail.text
        assert "before-gate" not in detail.text and "tick-0" not in detail.text and "run-result" not in detail.text

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
    # The last render brings the run's output out of band (it sits below the output list); never the list itself.
    assert '<div id="run-result" hx-swap-oob="true">' in final.text and "released" in final.text
    assert "after-gate" not in final.text and "tick-1" not in final.text and "live-dot" not in final.text

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
    assert "<h1>Session not found</h1>" in missing.text and '<a href="/console/runs">Back to the runs</a>' in missing.text
    # Its runs have all ended: the page does not poll, and its polled part says it is done (286).
    assert "hx-get" not in page
    assert console.get(f"{stack.api_url}/console/sessions/{session}/detail", timeout=30).status_code == 286


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


def test_runs_table_shows_short_ids_with_the_whole_id_in_the_link_and_title(
        stack: Stack, client: Client, console: requests.Session) -> None:
    ref = _ref("short")
    client.upload(ref, SUCCEEDS)
    request_id = _ok(client.invoke(ref, input={"n": 1}, cache=False))["request_id"]
    session_id = client.run(request_id)["session_id"]
    assert len(request_id) > 20 and len(session_id) > 20  # generated ids: req_/sess_ and 32 hex digits
    page = _page(console, stack, "/console/runs")
    link = re.search(rf'<a class="mono" href="/console/runs/{request_id}" title="{request_id}">([^<]+)</a>', page)
    assert link and link.group(1) == request_id[:12] + "…"
    session = re.search(rf'<a class="mono" href="/console/sessions/{session_id}" title="{session_id}">([^<]+)</a>',
                        page)
    assert session and session.group(1) == session_id[:12] + "…"
    # The Cache column can be hidden on a narrow window (console.css): its cells are marked for that.
    assert '<th scope="col" class="col-cache">Cache</th>' in page and 'class="col-cache"' in page


def test_a_preview_run_shows_as_a_local_run_without_a_workflow_link(stack: Stack, client: Client,
                                                                    console: requests.Session) -> None:
    previewed = client.post("/api/v1/workflows/preview", json={"script": "def execute(ctx):\n    return 1\n",
                                                                "input": {}})
    assert previewed.status_code == 200, previewed.text
    request_id = previewed.json()["request_id"]
    preview_ref = client.run(request_id)["workflow"]
    assert preview_ref.startswith("fp-preview-")

    rows = _page(console, stack, "/console/runs/rows")
    row = next(r for r in rows.split('<tr class="run-row">') if f'href="/console/runs/{request_id}"' in r)
    assert "local run (flowpool run)" in row and "/console/workflows/" not in row and preview_ref not in row
    run_page = _page(console, stack, f"/console/runs/{request_id}")
    status_line = re.search(r'<p class="run-status-line">(.*?)</p>', run_page, re.S)
    assert status_line and "local run (flowpool run)" in status_line.group(1)
    assert "/console/workflows/fp-preview-" not in run_page
    assert "Open in Playground" not in run_page  # a local run has no workflow to open
    assert '<span class="tl-name">local run (flowpool run)</span>' in _section(run_page, "run-timeline-title")
    session_page = _page(console, stack, f"/console/sessions/{client.run(request_id)['session_id']}")
    assert "local run (flowpool run)" in session_page and "/console/workflows/fp-preview-" not in session_page


def _fingerprint(page: str) -> str:
    found = re.search(r'<tbody id="runs-rows"[^>]* data-fingerprint="([0-9a-f]+)"', page)
    assert found, "the polled table body carries its rows' fingerprint"
    return found.group(1)


def test_the_rows_fragment_answers_204_while_the_rows_are_the_ones_the_page_shows(
        stack: Stack, client: Client, console: requests.Session) -> None:
    ref = _ref("rows")
    client.upload(ref, SUCCEEDS)
    first = _ok(client.invoke(ref, input={"n": 1}, cache=False))["request_id"]
    page = _page(console, stack, "/console/runs")
    shown = _fingerprint(page)
    # The table body is no live region (a poll would re-read it); one persistent status element says what is new.
    tbody = re.search(r'<tbody id="runs-rows"[^>]*>', page)
    assert tbody and "aria-live" not in tbody.group(0) and 'data-announce="runs-status"' in tbody.group(0)
    assert '<p id="runs-status" class="runs-status muted" role="status"></p>' in page
    assert 'data-local="compact"' in page and 'Time <span class="zone-name" data-local-zone></span>' in page

    rows_url = f"{stack.api_url}/console/runs/rows"
    same = console.get(rows_url, headers={"X-Console-Fingerprint": shown}, timeout=30)
    assert same.status_code == 204 and same.text == "" and same.headers["X-Console-Fingerprint"] == shown
    second = _ok(client.invoke(ref, input={"n": 2}, cache=False))["request_id"]
    changed = console.get(rows_url, headers={"X-Console-Fingerprint": shown}, timeout=30)
    assert changed.status_code == 200 and second in changed.text and first in changed.text
    assert f'data-id="{second}"' in changed.text  # what console.js counts to say "1 new run"
    now = changed.headers["X-Console-Fingerprint"]
    assert now != shown and now == _fingerprint(_page(console, stack, "/console/runs"))
    assert console.get(rows_url, headers={"X-Console-Fingerprint": now}, timeout=30).status_code == 204
    # Without a fingerprint (or with another filter's) the rows come whole.
    assert console.get(rows_url, timeout=30).status_code == 200
    assert console.get(rows_url, params={"status": "failed"}, headers={"X-Console-Fingerprint": now},
                       timeout=30).status_code == 200


def test_go_to_run_opens_a_run_by_its_id_and_says_when_there_is_none(stack: Stack, client: Client,
                                                                     console: requests.Session) -> None:
    ref = _ref("go")
    client.upload(ref, SUCCEEDS)
    request_id = _ok(client.invoke(ref, input={}, cache=False))["request_id"]
    page = _page(console, stack, "/console/runs")
    assert '<form class="go-to-run" method="get" action="/console/runs/go"' in page and 'name="request_id"' in page
    go = f"{stack.api_url}/console/runs/go"
    for typed in (request_id, f"  {request_id} ", f"{stack.api_url}/console/runs/{request_id}"):
        found = console.get(go, params={"request_id": typed}, allow_redirects=False, timeout=30)
        assert found.status_code == 303 and found.headers["Location"].endswith(f"/console/runs/{request_id}"), typed
    assert console.get(go, params={"request_id": ""}, allow_redirects=False, timeout=30).headers[
        "Location"].endswith("/console/runs")
    for missing in (console.get(go, params={"request_id": "req_nothing_here"}, timeout=30),
                    console.get(f"{stack.api_url}/console/runs/req_nothing_here", timeout=30)):
        assert missing.status_code == 404
        assert "<title>Run not found · flowpool console</title>" in missing.text and "<h1>Run not found</h1>" in missing.text
        assert '<a href="/console/runs">Back to the runs</a>' in missing.text and "Error 404" not in missing.text


MANY = """
    def execute(ctx):
        ctx.log.info("line-start")
        for i in range({n}):
            if i == {n} - 10:
                ctx.log.info("line-late")
            ctx.emit("text", f"c-{{i}}")
        ctx.log.info("line-end")
        return "many"
"""


def test_a_run_that_sent_many_items_shows_the_newest_with_a_note_of_how_many_are_not_shown(
        stack: Stack, client: Client, console: requests.Session) -> None:
    from flowpool.api.console.runs import OUTPUT_ITEMS
    n = OUTPUT_ITEMS + 50
    ref = _ref("many")
    client.upload(ref, MANY.format(n=n))
    request_id = _ok(client.invoke(ref, input={}, cache=False))["request_id"]
    output = _section(_page(console, stack, f"/console/runs/{request_id}"), "run-output-title")
    items = re.findall(r'<li class="out-(chunk|log)[^"]*"[^>]*>(.*?)</li>', output, re.S)
    assert len(items) == OUTPUT_ITEMS
    # n chunks and 3 lines: the newest OUTPUT_ITEMS in order; "line-start" came before chunks not read, so it is
    # left out with them rather than shown in a place that may be wrong.
    texts = [re.sub(r"<[^>]+>", "", body) for _, body in items]
    hidden = n + 3 - OUTPUT_ITEMS
    assert texts[0].endswith(f"c-{n - OUTPUT_ITEMS + 2}") and texts[-1].startswith("log")
    assert "line-end" in texts[-1] and "line-late" in texts[-12] and texts[-11].endswith(f"c-{n - 10}")
    assert not any("line-start" in t for t in texts)
    note = re.search(r'<p class="muted output-hidden" id="run-output-hidden"( hidden)? data-hidden="(\d+)">(.*?)</p>',
                     output, re.S)
    assert note and note.group(1) is None and int(note.group(2)) == hidden
    assert f"{hidden} earlier items not shown" in note.group(3) and f"/api/v1/runs/{request_id}" in note.group(3)


def test_a_session_page_polls_its_timeline_while_a_run_of_it_goes(
        stack: Stack, client: Client, console: requests.Session, provider: StandInProvider) -> None:
    ref, gate, session = _ref("holds"), uuid.uuid4().hex, f"s-{uuid.uuid4().hex[:8]}"
    client.upload(ref, HOLDS.format(origin=provider.origin, gate=gate))
    started = client.post("/api/v1/runs", json={"model": f"workflow:{ref}", "input": {}, "cache": False,
                                                "session_id": session})
    assert started.status_code == 202, started.text
    request_id = started.json()["request_id"]
    try:
        eventually(lambda: provider.held(gate) == 1, timeout=30, what="the run waits at the gate")
        page = _page(console, stack, f"/console/sessions/{session}")
        assert f'<div id="session-detail" data-poll hx-get="/console/sessions/{session}/detail" hx-trigger="every 3s"' \
            in page
        live = console.get(f"{stack.api_url}/console/sessions/{session}/detail", timeout=30)
        assert live.status_code == 200 and "<html" not in live.text and "badge-running" in live.text
        assert f'href="/console/runs/{request_id}"' in live.text and "live-dot" in live.text
    finally:
        provider.open_gate(gate)
    eventually(lambda: client.run(request_id)["status"] == "succeeded", timeout=30, what="the run to end")

    def ended() -> requests.Response | None:
        answer = console.get(f"{stack.api_url}/console/sessions/{session}/detail", timeout=30)
        return answer if answer.status_code == 286 else None

    final = eventually(ended, timeout=30, what="the session's part answers 286 once none of its runs goes")
    assert "badge-succeeded" in final.text and "live-dot" not in final.text
