"""The web console in a real headless Chromium: sign in, every page, live updates, and the key kept out.

One browser and one signed-in context serve the module, over the session's
stack. Runs that must be seen while they go wait at a gate of the stand-in
provider (``/hold/<gate>``), which the test opens: what the page shows before
and after is checked without any clock. Each page is saved as a full-page
screenshot in a temporary folder, or in the folder FLOWPOOL_CONSOLE_SCREENSHOTS
names (``docs/console`` refreshes the README's images); the assertions are on
content and layout geometry only, never on pixels.
"""
from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from zoneinfo import ZoneInfo

import pytest
import requests

from flowpool.devstack import Stack
from tests.helpers import Client, eventually
from tests.provider import StandInProvider

from .conftest import TIMEZONE, WAIT_MS, new_context

pytestmark = pytest.mark.slow

# The window widths the console must fit without scrolling sideways: its narrowest supported, and a laptop's.
WIDTHS = (1024, 1280)

STREAMS = """
    import time

    from flowpool_workflow import WorkflowContext

    INPUT_SCHEMA = {{
        "topic": {{"type": "string", "description": "What the steps are about"}},
        "hold": {{"type": "string", "description": "A URL that answers once the caller lets the run finish"}},
    }}
    TIMEOUT_SECONDS = 60
    CACHE_TTL_SECONDS = 0  # every invocation runs: the tests watch runs, not cached answers
    # {marker}


    def execute(ctx: WorkflowContext):
        topic = (ctx.input or {{}}).get("topic") or "nothing"
        ctx.log.info("starting", topic=topic)
        for i in range(3):
            ctx.emit("step", f"{{topic}} {{i}}")
            time.sleep(0.1)
        hold = (ctx.input or {{}}).get("hold")
        if hold:
            ctx.log.info("waiting to be let through")
            ctx.http.get(hold)
            ctx.emit("step", f"{{topic}} let through")
        ctx.log.info("finished", steps=3)
        return {{"topic": topic, "steps": 3}}
"""

ASKS = """
    from flowpool_workflow import WorkflowContext

    APPLICATION = "{app}"
    INPUT_SCHEMA = {{"q": {{"type": "string", "description": "The question", "required": True}}}}
    CACHE_TTL_SECONDS = 0


    def execute(ctx: WorkflowContext):
        ctx.log.info("asking the model")
        resp = ctx.chat.completions.create(intent="answer", messages=[{{"role": "user", "content": ctx.input["q"]}}])
        return {{"answer": resp["choices"][0]["message"]["content"]}}
"""

FAILS = """
    def execute(ctx):
        ctx.log.warning("about to fail")
        raise ValueError("the e2e workflow fails on purpose")
"""

# Emits three batches of lines, held at a gate between them; first fetches a document with a long path (its row in
# the calls table must wrap, not widen the table).
CHATTY = """
    from flowpool_workflow import WorkflowContext

    CACHE_TTL_SECONDS = 0
    TIMEOUT_SECONDS = 60


    def execute(ctx: WorkflowContext):
        ctx.http.get(ctx.input["doc"])
        for batch, hold in (("a", ctx.input["first"]), ("b", ctx.input["second"]), ("c", None)):
            for i in range(40):
                ctx.emit("line", f"{batch} {i}")
            if hold:
                ctx.http.get(hold)
        return {"lines": 120}
"""

# In-page counters of the polls of the element #ID: tried (htmx:beforeRequest), skipped by console.js (prevented),
# sent, and the answers' statuses.
COUNT_POLLS = """(id) => {
    const target = document.getElementById(id);
    window.__polls = {tries: 0, prevented: 0, sent: 0, statuses: []};
    document.addEventListener("htmx:beforeRequest", (e) => {
        if (e.detail.elt !== target) return;
        window.__polls.tries += 1;
        if (e.defaultPrevented) window.__polls.prevented += 1;
    });
    document.addEventListener("htmx:beforeSend", (e) => { if (e.detail.elt === target) window.__polls.sent += 1; });
    document.addEventListener("htmx:afterRequest", (e) => {
        if (e.detail.elt === target) window.__polls.statuses.push(e.detail.xhr.status);
    });
}"""

AT_BOTTOM = "(l => l.scrollHeight - l.scrollTop - l.clientHeight <= 8)(document.getElementById('run-output'))"


class Console:
    """The module's account, its workflows and runs, and a browser context signed in to the console."""

    def __init__(self, base_url: str, api: Client, context: Any, provider: StandInProvider, suffix: str,
                 shots: Path) -> None:
        self.base_url = base_url
        self.shots = shots  # where screenshots go (the screenshots fixture)
        self.account = f"e2e-{suffix}"
        self.api = api
        self.context = context
        self.provider = provider
        self.streams, self.asks, self.fails = f"e2e-streams-{suffix}", f"e2e-asks-{suffix}", f"e2e-fails-{suffix}"
        self.session_id = f"e2e-session-{suffix}"
        self.urls: list[str] = []  # every URL the browser asked for
        self.pages: list[str] = []  # every console page a test opened
        context.on("request", lambda request: self.urls.append(request.url))

    def page(self, path: str) -> Any:
        """A new tab at ``path``, loaded."""
        page = self.context.new_page()
        self.pages.append(path)
        page.goto(self.base_url + path, wait_until="load", timeout=WAIT_MS)
        return page

    def gate(self) -> tuple[str, str]:
        """A gate of the stand-in provider: the URL a run is held at, and the one that lets it through."""
        name = uuid.uuid4().hex
        return f"{self.provider.origin}/hold/{name}", f"{self.provider.origin}/gate/{name}"

    def start(self, ref: str, **body: Any) -> str:
        """Start a run through the API (POST /api/v1/runs); its request id."""
        response = self.api.post("/api/v1/runs", json={"model": f"workflow:{ref}", **body})
        assert response.status_code == 202, response.text
        return response.json()["request_id"]

    def ended(self, request_id: str) -> dict[str, Any]:
        """The run as the API shows it once it has ended."""
        response = self.api.get(f"/api/v1/runs/{request_id}?wait=30", timeout=60)
        assert response.status_code == 200, response.text
        run = response.json()["data"]
        assert run["status"] not in ("queued", "running"), run
        return run


    def shoot(self, page: Any, name: str) -> None:
        """Save the whole page as <name>.png in the screenshots folder (every page, every run)."""
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True, timeout=WAIT_MS)
        assert path.stat().st_size > 0, path


def fits_across(page: Any, selector: str) -> dict[str, float]:
    """How wide ``selector``'s content is against its container (.table-wrap) and the window, in CSS pixels."""
    return page.evaluate("""(selector) => {
        const table = document.querySelector(selector);
        const wrap = table.parentElement;
        return {scroll: table.scrollWidth, room: wrap.clientWidth, right: wrap.getBoundingClientRect().right,
                window: document.documentElement.clientWidth};
    }""", selector)


def box(page: Any, selector: str) -> dict[str, float]:
    """Where ``selector`` is drawn (its bounding box in CSS pixels)."""
    found = page.locator(selector).bounding_box()
    assert found is not None, f"{selector} is not drawn"
    return found


def sign_in_by_keyboard(page: Any, base_url: str, key: str) -> None:
    """Sign in as a keyboard user does: the key typed into the focused field, Tab to the button, Enter."""
    page.goto(f"{base_url}/console/sign-in", wait_until="load", timeout=WAIT_MS)
    for _ in range(10):  # the field has autofocus; Tab to it where the browser did not focus it
        if page.evaluate("document.activeElement && document.activeElement.id") == "api_key":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "api_key"
    page.keyboard.type(key)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Sign in"
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/console/workflows$"), timeout=WAIT_MS)


def polls(page: Any) -> dict[str, Any]:
    """The page's poll counters (COUNT_POLLS)."""
    return page.evaluate("window.__polls")


def gate_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def mark_page(page: Any) -> None:
    """Leave a mark in the page's window: a reload would lose it."""
    page.evaluate("window.__e2eNoReload = 'still here'")


def not_reloaded(page: Any) -> bool:
    return page.evaluate("window.__e2eNoReload") == "still here"


@pytest.fixture(scope="module")
def console(stack: Stack, browser: Any, provider: StandInProvider, screenshots: Path) -> Iterator[Console]:
    """A fresh account with three workflows (one a draft waiting), signed in to the console by keyboard."""
    assert stack.api_url is not None
    suffix = uuid.uuid4().hex[:6]
    api = Client(stack.api_url, stack.create_account(f"e2e-{suffix}"))
    context = new_context(browser)
    try:
        c = Console(stack.api_url, api, context, provider, suffix, screenshots)
        app = f"e2e-app-{suffix}"
        put = api.request("PUT", f"/api/v1/applications/{app}", json={"intents": {"answer": {
            "model": "fail", "base_url": provider.base_url, "fallbacks": [{"model": "echo", "base_url": provider.base_url}]}}})
        assert put.status_code == 201, put.text
        api.upload(c.streams, STREAMS.format(marker="first version"), description="Emits three steps, logging each")
        api.upload(c.asks, ASKS.format(app=app), description="Asks a model, through a fallback")
        api.upload(c.fails, FAILS)
        # A second version as a draft: the workflow page's activate button publishes it.
        api.upload(c.streams, STREAMS.format(marker="second version"), publish_version=False,
                   version_notes="the same steps, published from the console")
        page = context.new_page()
        sign_in_by_keyboard(page, stack.api_url, api.key)
        page.close()
        yield c
    finally:
        context.close()


@pytest.fixture(scope="module")
def session_runs(console: Console) -> list[str]:
    """Two ended runs of one session: a model call with a fallback, then the streaming workflow."""
    ids = [console.start(console.asks, input={"q": "where is my parcel"}, session_id=console.session_id),
           console.start(console.streams, input={"topic": "tides"}, session_id=console.session_id)]
    for request_id in ids:
        assert console.ended(request_id)["status"] == "succeeded"
    return ids


def test_signing_in_by_keyboard_opens_the_workflows_page(console: Console, browser: Any) -> None:
    context = new_context(browser)
    try:
        page = context.new_page()
        page.goto(f"{console.base_url}/console/runs", wait_until="load", timeout=WAIT_MS)
        assert "/console/sign-in?next=/console/runs" in page.url and page.title().startswith("Sign in")
        console.shoot(page, "sign-in")
        sign_in_by_keyboard(page, console.base_url, console.api.key)
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
    hold, let_through = console.gate()
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


def test_a_running_runs_page_updates_live_until_it_succeeds(console: Console) -> None:
    hold, let_through = console.gate()
    request_id = console.start(console.streams, input={"topic": "live", "hold": hold})
    eventually(lambda: console.api.run(request_id)["status"] == "running", timeout=30, what="the run to start")
    page = console.page(f"/console/runs/{request_id}")
    mark_page(page)
    assert page.locator(".run-status-line .badge-running").is_visible()
    page.wait_for_selector("#run-output li.out-chunk:has-text('live 2')", timeout=WAIT_MS)
    assert page.locator("#run-output li.out-chunk:has-text('live let through')").count() == 0
    requests.post(let_through, timeout=10)
    page.wait_for_selector("#run-output li.out-chunk:has-text('live let through')", timeout=WAIT_MS)
    page.wait_for_selector(".run-status-line .badge-succeeded", timeout=WAIT_MS)
    assert not_reloaded(page)
    assert [t.strip() for t in page.locator("#run-output li.out-chunk .out-content").all_inner_texts()] == [
        "live 0", "live 1", "live 2", "live let through"]
    assert page.locator("#run-output li.out-log:has-text('finished')").count() == 1


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


def test_the_runs_page_shows_a_new_run_without_a_reload(console: Console) -> None:
    page = console.page("/console/runs")
    mark_page(page)
    request_id = console.start(console.fails, input={})
    link = f"a[href='/console/runs/{request_id}']"
    row = page.locator("#runs-rows tr", has=page.locator(link))
    row.wait_for(timeout=WAIT_MS)
    assert not_reloaded(page)
    assert console.ended(request_id)["status"] == "failed"
    page.wait_for_selector(f"#runs-rows tr:has({link}) .badge-failed", timeout=WAIT_MS)
    # The id shows short; its title says it whole.
    assert page.locator(link).inner_text() == request_id[:12] + "…"
    assert page.locator(link).get_attribute("title") == request_id


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


def test_a_live_run_page_keeps_focus_and_follows_its_newest_output_only_while_scrolled_to_the_bottom(
        console: Console) -> None:
    ref = f"e2e-chatty-{uuid.uuid4().hex[:6]}"
    console.api.upload(ref, CHATTY)
    first, let_first = console.gate()
    second, let_second = console.gate()
    doc = f"{console.provider.origin}/doc/{'a-long-path-segment-' * 8}end"
    request_id = console.start(ref, input={"doc": doc, "first": first, "second": second})
    eventually(lambda: console.provider.held(gate_name(first)) == 1, timeout=30, what="the run to hold after a 39")
    page = console.page(f"/console/runs/{request_id}")
    mark_page(page)
    page.evaluate(COUNT_POLLS, "run-detail")
    items = page.locator("#run-output li")
    assert items.count() == 40
    assert page.evaluate("(l => l.scrollHeight > l.clientHeight)(document.getElementById('run-output'))")
    assert page.evaluate(AT_BOTTOM)  # a live run's list opens on its newest item
    page.evaluate("window.__first = document.querySelector('#run-output li')")

    # Focus on the timeline (inside the polled part): polls are skipped, and focus stays on the same element.
    page.locator("#run-detail .tl-link").first.focus()
    page.evaluate("window.__focused = document.activeElement")
    page.wait_for_function("() => window.__polls.tries >= 2")
    assert polls(page)["sent"] == 0 and polls(page)["prevented"] == polls(page)["tries"]
    assert page.evaluate("document.activeElement === window.__focused")
    # Focus elsewhere: the polls go again.
    page.locator("#run-output").focus()
    page.wait_for_function("() => window.__polls.sent >= 1")

    # At the bottom, the list follows what the stream appends.
    requests.post(let_first, timeout=10)
    page.wait_for_selector("#run-output li:has-text('b 39')", timeout=WAIT_MS)
    assert page.evaluate(AT_BOTTOM)
    # Scrolled up, it stays where the reader is; nothing the stream appended is lost to a poll.
    page.evaluate("document.getElementById('run-output').scrollTop = 0")
    requests.post(let_second, timeout=10)
    page.wait_for_selector("#run-output li:has-text('c 39')", timeout=WAIT_MS)
    page.wait_for_selector("#run-announce:text-is('The run has ended: succeeded')", timeout=WAIT_MS)
    assert page.evaluate("document.getElementById('run-output').scrollTop") == 0
    assert items.count() == 120 and not_reloaded(page)
    assert page.evaluate("document.querySelector('#run-output li') === window.__first")
    assert page.locator(".run-status-line .badge-succeeded").is_visible()
    assert page.locator("#run-result .json-node").count() >= 1  # the output, come with the last render

    # The calls table (the long path's row wraps) and the timeline's axis fit a 1024px window.
    page.wait_for_selector("table.calls tr.call-row", timeout=WAIT_MS)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 800})
        fit = fits_across(page, "table.calls")
        assert fit["scroll"] <= fit["room"] and fit["right"] <= fit["window"], (width, fit)
        axis = page.evaluate("""() => {
            const scale = document.querySelector('.run-timeline .tl-scale').getBoundingClientRect();
            const ticks = [...document.querySelectorAll('.run-timeline .tl-tick')];
            const last = ticks[ticks.length - 1].getBoundingClientRect();
            return {size: parseFloat(getComputedStyle(ticks[0]).fontSize), right: scale.right, last: last.right,
                    left: scale.left, first: ticks[0].getBoundingClientRect().left};
        }""")
        assert axis["size"] >= 11 and axis["last"] <= axis["right"] + 0.5 and axis["first"] >= axis["left"] - 0.5, \
            (width, axis)
    page.set_viewport_size({"width": 1280, "height": 800})


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


def test_the_runs_page_polls_without_taking_focus_and_says_how_many_runs_are_new(console: Console) -> None:
    page = console.page("/console/runs")
    page.evaluate(COUNT_POLLS, "runs-rows")
    # Rows unchanged: the poll is answered 204 and nothing is swapped (the same row elements stay).
    page.wait_for_function("() => window.__polls.statuses.includes(204)")
    page.evaluate("window.__row = document.querySelector('#runs-rows tr'); window.__polls.statuses = []")
    page.wait_for_function("() => window.__polls.statuses.includes(204)")
    assert page.evaluate("document.querySelector('#runs-rows tr') === window.__row")

    # A link in the table has focus: no poll is sent, so a new run does not take it away.
    page.locator("#runs-rows tr.run-row a.mono").first.focus()
    page.evaluate("window.__focused = document.activeElement")
    sent = polls(page)["sent"]
    request_id = console.start(console.fails, input={})
    assert console.ended(request_id)["status"] == "failed"
    tries = polls(page)["tries"]
    page.wait_for_function("(n) => window.__polls.tries >= n", arg=tries + 2)
    assert polls(page)["sent"] == sent and page.evaluate("document.activeElement === window.__focused")
    assert page.locator(f"a[href='/console/runs/{request_id}']").count() == 0
    # Focus leaves the table: the next poll brings the run, and the status line says so once.
    page.locator("#go-to-run").focus()
    page.wait_for_selector(f"#runs-rows a[href='/console/runs/{request_id}']", timeout=WAIT_MS)
    assert page.locator("#runs-status").inner_text() == "1 new run"
    assert page.locator("#runs-rows").get_attribute("aria-live") is None

    # A failing poll makes the next ones wait longer: polls are skipped between failures.
    page.route("**/console/runs/rows*", lambda route: route.fulfill(status=500, body="down for the test"))
    page.wait_for_function("() => window.__polls.statuses.filter(s => s === 500).length >= 2")
    tried = polls(page)
    assert tried["prevented"] >= 1 and tried["tries"] > tried["sent"], tried
    page.close()


def test_a_session_page_updates_while_a_run_of_it_goes(console: Console) -> None:
    hold, let_through = console.gate()
    session = f"e2e-live-{uuid.uuid4().hex[:6]}"
    request_id = console.start(console.streams, input={"topic": "session", "hold": hold}, session_id=session)
    eventually(lambda: console.api.run(request_id)["status"] == "running", timeout=30, what="the run to start")
    page = console.page(f"/console/sessions/{session}")
    mark_page(page)
    row = f"#session-detail tr:has(a[href='/console/runs/{request_id}'])"
    assert page.locator(f"{row} .badge-running").is_visible()
    requests.post(let_through, timeout=10)
    page.wait_for_selector(f"{row} .badge-succeeded", timeout=WAIT_MS)
    assert not_reloaded(page) and page.locator("#session-detail .live-dot").count() == 0


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
