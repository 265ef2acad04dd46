"""The web console in a real headless Chromium: sign in, every page, and the key kept out.

One browser and one signed-in context serve the module, over the session's
stack (the ``console`` fixture of conftest.py). Each page is saved as a
full-page screenshot in a temporary folder, or in the folder
FLOWPOOL_CONSOLE_SCREENSHOTS names (``docs/console`` refreshes the README's
images); the assertions are on content and layout geometry only, never on
pixels. What updates while a run goes is in test_console_live.py.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests

from .conftest import (TIMEZONE, WAIT_MS, WIDTHS, Console, box, fits_across, gate, mark_page, new_context,
                       not_reloaded, sign_in)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session_runs(console: Console) -> list[str]:
    """Two ended runs of one session: a model call with a fallback, then the streaming workflow."""
    ids = [console.start(console.asks, input={"q": "where is my parcel"}, session_id=console.session_id),
           console.start(console.streams, input={"topic": "tides"}, session_id=console.session_id)]
    for request_id in ids:
        assert console.api.ended(request_id)["status"] == "succeeded"
    return ids


def test_signing_in_by_keyboard_opens_the_workflows_page(console: Console, browser: Any) -> None:
    context = new_context(browser)
    try:
        page = context.new_page()
        page.goto(f"{console.base_url}/console/runs", wait_until="load", timeout=WAIT_MS)
        assert "/console/sign-in?next=/console/runs" in page.url and page.title().startswith("Sign in")
        console.shoot(page, "sign-in")
        sign_in(page, console.base_url, console.api.key, keyboard=True)
        assert page.locator("nav[aria-label=Console]").is_visible()
        assert page.locator(".account-name").inner_text() == console.account
    finally:
        context.close()


def test_the_playground_streams_a_run_then_shows_its_output_and_links_to_the_run(console: Console) -> None:
    page = console.page(f"/console/playground?workflow={console.streams}")
    textarea = page.locator("#playground-input")
    assert json.loads(textarea.input_value()) == {"topic": "", "hold": ""}  # from its INPUT_SCHEMA
    # Switching the workflow fills in the other's example; switching back, this one's.
    page.select_option("#playground-workflow", console.asks)
    assert json.loads(textarea.input_value()) == {"q": ""}
    page.select_option("#playground-workflow", console.streams)
    textarea.fill("{oops")
    textarea.press("Control+Enter")
    page.wait_for_selector("#playground-input-error:has-text('Not valid JSON')", timeout=WAIT_MS)
    hold, let_through = gate(console.provider)
    textarea.fill(json.dumps({"topic": "tides", "hold": hold}, indent=2))
    assert page.locator("#playground-input-error").is_hidden()
    textarea.press("Control+Enter")
    chunks = page.locator("#playground-chunks li")
    # The three steps stream in while the run is held: no output yet.
    page.wait_for_selector("#playground-chunks li:nth-child(3)", timeout=WAIT_MS)
    assert chunks.all_inner_texts() == ["step: tides 0", "step: tides 1", "step: tides 2"]
    assert page.locator("#playground-output-box").is_hidden()
    assert page.locator("#playground-run-status").inner_text() == "running"
    requests.post(let_through, timeout=10)
    page.wait_for_selector("#playground-output-box:not([hidden])", timeout=WAIT_MS)
    assert json.loads(page.locator("#playground-output").inner_text()) == {"topic": "tides", "steps": 3}
    assert chunks.all_inner_texts()[-1] == "step: tides let through"
    assert any("starting" in line for line in page.locator("#playground-logs li").all_inner_texts())
    page.wait_for_selector("#playground-run-status:text-is('succeeded')", timeout=WAIT_MS)
    assert page.locator("#playground-placeholder").is_hidden()
    # A wide window: the form on the left, the run on the right; the input as wide as its column.
    form, side, area = box(page, "#playground-form"), box(page, ".playground-side"), box(page, "#playground-input")
    assert form["x"] + form["width"] <= side["x"] and form["width"] > 400
    assert area["width"] >= form["width"] - 1
    # Under 1100px one column: the run comes under the form, and the input still fills the width.
    page.set_viewport_size({"width": 1024, "height": 800})
    form, side, area = box(page, "#playground-form"), box(page, ".playground-side"), box(page, "#playground-input")
    assert side["y"] >= form["y"] + form["height"] and area["width"] >= form["width"] - 1
    page.set_viewport_size({"width": 1280, "height": 800})
    console.shoot(page, "playground")
    link = page.locator("#playground-run-link")
    request_id = link.inner_text()
    assert request_id.startswith("req_")
    link.click()
    page.wait_for_url(re.compile(rf".*/console/runs/{request_id}$"), timeout=WAIT_MS)
    assert page.locator(".run-status-line .badge-succeeded").is_visible()
    assert "tides let through" in page.locator("#run-output").inner_text()


def test_the_timeline_shows_the_model_calls_with_the_fallback_tokens_and_first_token(
        console: Console, session_runs: list[str]) -> None:
    request_id = session_runs[0]
    calls = console.api.run(request_id)["model_calls"]
    assert [(c["model"], c["fallback"]) for c in calls] == [("fail", 0), ("echo", 1)]
    page = console.page(f"/console/runs/{request_id}")
    rows = page.locator(".run-timeline .tl-row.tl-model")
    assert rows.count() == 2
    fallback = rows.nth(1)
    assert fallback.locator(".tl-fallback").inner_text() == "fallback #1"
    assert f"{calls[1]['total_tokens']} tokens" in fallback.locator(".tl-meta").inner_text()
    assert fallback.locator("line.tl-ttft").count() == 1  # the first token, marked on the bar
    assert "tl-bad" in (rows.nth(0).get_attribute("class") or "")  # the failed primary
    answered = page.locator("table.calls tr.call-row").nth(1)
    assert "fallback #1" in answered.inner_text() and "—" not in answered.locator("td").nth(3).inner_text()
    # The failed primary took time (its retries): its row and its bar say how long; it had no first token.
    failed = page.locator("table.calls tr.call-row").nth(0)
    assert calls[0]["latency_ms"] > 0 and calls[0]["ttft_ms"] is None
    assert failed.locator("td").nth(2).inner_text().strip() not in ("", "—")
    assert failed.locator("td").nth(3).inner_text().strip() == "—"
    assert rows.nth(0).locator(".tl-meta").inner_text().startswith("error · ")
    console.shoot(page, "run")


def test_times_show_in_the_viewers_zone(console: Console, session_runs: list[str]) -> None:
    record = console.api.run(session_runs[0])
    page = console.page(f"/console/runs/{session_runs[0]}")
    queued = page.locator(".run-header dt:text-is('Queued') + dd time")
    moment = datetime.fromisoformat(queued.get_attribute("datetime").replace("Z", "+00:00"))
    assert abs(moment.timestamp() - record["queued_at"]) < 0.001
    local = datetime.fromtimestamp(record["queued_at"], timezone.utc).astimezone(ZoneInfo(TIMEZONE))
    # What Intl.DateTimeFormat("en-US", {dateStyle: "medium", timeStyle: "medium"}) writes, then the zone.
    expected = (f"{local:%b} {local.day}, {local.year}, {local.hour % 12 or 12}:{local:%M:%S} {local:%p} "
                f"{TIMEZONE}")
    shown = re.sub(r"[\u202f\u00a0]", " ", queued.inner_text())
    assert shown == expected, (shown, expected)
    # A table's cells are compact, without the zone (the column's header says it once); the title is the full time.
    page = console.page(f"/console/sessions/{console.session_id}")
    cell = page.locator(f"#{'run-' + session_runs[0]} td.col-time time")
    compact = f"{local.month}/{local.day}/{local:%y}, {local.hour % 12 or 12}:{local:%M:%S} {local:%p}"
    assert re.sub(r"[\u202f\u00a0]", " ", cell.inner_text()) == compact
    assert re.sub(r"[\u202f\u00a0]", " ", cell.get_attribute("title") or "") == expected
    assert page.locator("table.runs-table th.col-time").inner_text() == f"Time ({TIMEZONE})"


def test_the_runs_table_fits_the_window_and_shows_a_local_run_without_a_workflow_link(console: Console) -> None:
    previewed = console.api.post("/api/v1/workflows/preview", json={
        "script": "def execute(ctx):\n    return {'ran': 'locally'}\n", "input": {}})
    assert previewed.status_code == 200, previewed.text
    request_id = previewed.json()["request_id"]
    page = console.page("/console/runs")
    row = page.locator("#runs-rows tr", has=page.locator(f"a[href='/console/runs/{request_id}']"))
    assert row.locator(".col-workflow").inner_text() == "local run (flowpool run)"
    assert row.locator(".col-workflow a").count() == 0
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 800})
        fit = fits_across(page, "table.runs-table")
        assert fit["scroll"] <= fit["room"] and fit["right"] <= fit["window"], (width, fit)
        # Every column that shows is inside the page: the last one (the request id) included.
        last = box(page, "table.runs-table thead th.col-id")
        assert last["x"] + last["width"] <= fit["window"], (width, last)
    page.set_viewport_size({"width": 1280, "height": 800})
    console.shoot(page, "runs")


def test_the_session_page_shows_the_sessions_runs_on_one_timeline(console: Console, session_runs: list[str]) -> None:
    page = console.page(f"/console/sessions/{console.session_id}")
    assert page.locator("h1").inner_text() == f"Session {console.session_id}"
    for request_id in session_runs:
        assert page.locator(f"table.runs-table a[href='/console/runs/{request_id}']").is_visible()
    fit = fits_across(page, "table.runs-table")
    assert fit["scroll"] <= fit["room"], fit
    assert page.locator(".timeline .tl-row.tl-run").count() == 2
    assert page.locator(".timeline .tl-row.tl-model").count() == 2
    console.shoot(page, "session")


def test_the_usage_page_shows_what_the_api_counts(console: Console, session_runs: list[str]) -> None:
    totals = console.api.get("/api/v1/usage").json()["data"]["totals"]
    page = console.page("/console/usage")
    assert page.locator("#total-runs").inner_text().split()[0] == str(totals["runs_total"])
    assert page.locator("#total-tokens").inner_text().split()[0] == str(totals["tokens"]["total"])
    assert page.locator("table.usage-models td", has_text="echo").count() == 1
    # Its days are UTC days, and it says when today's began in the viewer's zone.
    assert "UTC day" in page.locator("#utc-days").inner_text()
    assert TIMEZONE in page.locator("#utc-days time").inner_text()
    console.shoot(page, "usage")


def test_the_workflows_page_lists_them_and_a_workflows_page_highlights_its_source_and_activates_a_draft(
        console: Console, session_runs: list[str]) -> None:
    page = console.page("/console/workflows")
    for ref in (console.streams, console.asks, console.fails):
        assert page.locator(f"a[href='/console/workflows/{ref}']").is_visible()
    console.shoot(page, "workflows")
    page.click(f"a[href='/console/workflows/{console.streams}']")
    page.wait_for_url(re.compile(rf".*/console/workflows/{console.streams}$"), timeout=WAIT_MS)
    source = page.locator(".script-source")
    assert "def execute(ctx: WorkflowContext):" in source.inner_text()
    # Pygments marks keywords (class k, kn for import) server-side: the source is highlighted, not plain text.
    assert source.locator("span.k", has_text="def").count() >= 1 and source.locator("span.kn").count() >= 1
    # The chart's hours show in the viewer's zone (Tokyo), and its legend says so instead of "(UTC)".
    hours = page.locator("#runs-chart text[data-local='hour']")
    assert hours.count() == 6
    for n in range(hours.count()):
        moment = datetime.fromtimestamp(float(hours.nth(n).get_attribute("data-ts")), timezone.utc)
        assert hours.nth(n).text_content() == f"{moment.astimezone(ZoneInfo(TIMEZONE)):%H:%M}"
    assert page.locator(".chart-x-label").inner_text() == "hour (your time)"
    active = page.locator("#active-version").inner_text()
    assert page.locator("#script-heading .mono").inner_text() == active
    mark_page(page)
    draft_row = page.locator(".versions-table tr", has=page.locator(".badge", has_text="draft"))
    draft = draft_row.locator("td a.mono").inner_text()
    assert draft != active
    page.once("dialog", lambda dialog: dialog.accept())  # activating asks first (hx-confirm)
    draft_row.locator("button").click()
    page.wait_for_selector(f"#active-version:text-is('{draft}')", timeout=WAIT_MS)
    assert page.locator("#versions-status .flash").is_visible() and not_reloaded(page)
    # The script section follows the activation: it shows the version now active, times in the viewer's zone.
    page.wait_for_selector(f"#script-heading .mono:text-is('{draft}')", timeout=WAIT_MS)
    assert "# second version" in page.locator(".script-source").inner_text()
    assert TIMEZONE in page.locator("#script .hint time").inner_text()
    assert console.api.get(f"/api/v1/workflows/{console.streams}").json()["data"]["active_version"] == draft
    page.locator("#hourly-numbers summary").click()  # the chart's numbers as a table, shown in the screenshot
    assert page.locator("#hourly-numbers table").is_visible()
    console.shoot(page, "workflow")


def test_the_api_key_never_reaches_the_browser(console: Console, session_runs: list[str]) -> None:
    key = console.api.key
    paths = ["/console/workflows", f"/console/workflows/{console.streams}", "/console/runs",
             f"/console/runs/{session_runs[0]}", f"/console/sessions/{console.session_id}", "/console/usage",
             f"/console/playground?workflow={console.asks}"]
    for path in paths:
        page = console.page(path)
        assert key not in page.content(), path
        stored = page.evaluate("JSON.stringify([document.cookie, Object.entries(localStorage),"
                               " Object.entries(sessionStorage)])")
        assert key not in stored, path
        page.close()
    assert console.urls and not [url for url in console.urls if key in url]
    cookies = console.context.cookies()
    assert cookies and all(key not in cookie["value"] for cookie in cookies)
    assert all(cookie["httpOnly"] for cookie in cookies if cookie["name"] == "flowpool_console")


def test_a_failed_call_of_any_kind_is_drawn_in_the_legends_failed_colour(console: Console,
                                                                         session_runs: list[str]) -> None:
    page = console.page(f"/console/runs/{session_runs[0]}")
    colours = page.evaluate("""() => {
        const rows = document.querySelector('.run-timeline .tl-rows');
        const fill = (kind, phase) => {
            const li = document.createElement('li');
            li.className = 'tl-row ' + kind;
            const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
            const rect = document.createElementNS('http://www.w3.org/2000/svg', 'rect');
            rect.setAttribute('class', 'tl-seg tl-seg-' + phase);
            svg.appendChild(rect); li.appendChild(svg); rows.appendChild(li);
            const found = getComputedStyle(rect).fill;
            li.remove();
            return found;
        };
        const key = (name) => getComputedStyle(document.querySelector('.tl-key-' + name)).backgroundColor;
        return {
            keys: ['queued', 'running', 'ended', 'failed', 'model', 'http', 'workflow'].map(key),
            failed: key('failed'), http: key('http'), workflow: key('workflow'), model: key('model'),
            bad: [fill('tl-http tl-bad', 'call'), fill('tl-workflow tl-bad', 'call'), fill('tl-model tl-bad', 'call'),
                  fill('tl-run tl-bad', 'ended')],
            good: [fill('tl-http', 'call'), fill('tl-workflow', 'call'), fill('tl-model', 'call')],
            drawn: getComputedStyle(document.querySelector('.run-timeline .tl-row.tl-model.tl-bad .tl-seg-call')).fill,
        };
    }""")
    assert colours["bad"] == [colours["failed"]] * 4 and colours["drawn"] == colours["failed"]
    assert colours["good"] == [colours["http"], colours["workflow"], colours["model"]]
    assert len(set(colours["keys"])) == 7  # each swatch of the legend a colour of its own


def test_a_run_page_copies_its_id_and_the_runs_page_goes_to_a_run_by_its_id(
        console: Console, session_runs: list[str]) -> None:
    console.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=console.base_url)
    request_id = session_runs[1]
    page = console.page(f"/console/runs/{request_id}")
    page.locator("button[data-copy]").click()
    page.wait_for_selector("#run-announce:text-is('Request id copied')", timeout=WAIT_MS)
    assert page.evaluate("navigator.clipboard.readText()") == request_id
    link = page.get_by_role("link", name="Open in Playground with this input")
    assert link.get_attribute("href") == f"/console/playground?workflow={console.streams}&from={request_id}"

    runs = console.page("/console/runs")
    runs.locator("#go-to-run").fill(session_runs[0])
    runs.locator("#go-to-run").press("Enter")
    runs.wait_for_url(re.compile(rf".*/console/runs/{session_runs[0]}$"), timeout=WAIT_MS)
    runs.goto(f"{console.base_url}/console/runs/go?request_id=req_not_a_run", wait_until="load", timeout=WAIT_MS)
    assert runs.title().startswith("Run not found") and runs.locator("h1").inner_text() == "Run not found"
    assert runs.get_by_role("link", name="Back to the runs").get_attribute("href") == "/console/runs"


def test_every_page_loads_only_from_the_api_itself(console: Console, session_runs: list[str]) -> None:
    """No CDN, no web fonts, no third-party script: everything the browser fetched came from the API's origin."""
    for path in ["/console/workflows", f"/console/workflows/{console.streams}", "/console/runs",
                 f"/console/runs/{session_runs[0]}", "/console/usage", f"/console/playground?workflow={console.asks}"]:
        console.page(path).close()
    origin = console.api.base_url.rstrip("/") + "/"
    assert console.urls and [url for url in console.urls if not url.startswith(origin)] == []
