"""The web console in a real headless Chromium: sign in, every page, live updates, and the key kept out.

One browser and one signed-in context serve the module, over the session's
stack. Runs that must be seen while they go wait at a gate of the stand-in
provider (``/hold/<gate>``), which the test opens: what the page shows before
and after is checked without any clock. Each page is saved as a full-page
screenshot under docs/console/ (the README shows them); the assertions are
on content only, never on pixels.
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

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"

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


class Console:
    """The module's account, its workflows and runs, and a browser context signed in to the console."""

    def __init__(self, base_url: str, api: Client, context: Any, provider: StandInProvider, suffix: str) -> None:
        self.base_url = base_url
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


def shoot(page: Any, name: str) -> None:
    """Save the whole page as docs/console/<name>.png (written every run, for the README)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True, timeout=WAIT_MS)


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


def mark_page(page: Any) -> None:
    """Leave a mark in the page's window: a reload would lose it."""
    page.evaluate("window.__e2eNoReload = 'still here'")


def not_reloaded(page: Any) -> bool:
    return page.evaluate("window.__e2eNoReload") == "still here"


@pytest.fixture(scope="module")
def console(stack: Stack, browser: Any, provider: StandInProvider) -> Iterator[Console]:
    """A fresh account with three workflows (one a draft waiting), signed in to the console by keyboard."""
    assert stack.api_url is not None
    suffix = uuid.uuid4().hex[:6]
    api = Client(stack.api_url, stack.create_account(f"e2e-{suffix}"))
    context = new_context(browser)
    try:
        c = Console(stack.api_url, api, context, provider, suffix)
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
        shoot(page, "sign-in")
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
    shoot(page, "playground")
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
    shoot(page, "run")


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


def test_the_runs_page_shows_a_new_run_without_a_reload(console: Console) -> None:
    page = console.page("/console/runs")
    mark_page(page)
    request_id = console.start(console.fails, input={})
    row = page.locator("#runs-rows tr", has=page.locator(f"a:text-is('{request_id}')"))
    row.wait_for(timeout=WAIT_MS)
    assert not_reloaded(page)
    assert console.ended(request_id)["status"] == "failed"
    page.wait_for_selector(f"#runs-rows tr:has(a:text-is('{request_id}')) .badge-failed", timeout=WAIT_MS)
    shoot(page, "runs")


def test_the_session_page_shows_the_sessions_runs_on_one_timeline(console: Console, session_runs: list[str]) -> None:
    page = console.page(f"/console/sessions/{console.session_id}")
    assert page.locator("h1").inner_text() == f"Session {console.session_id}"
    for request_id in session_runs:
        assert page.locator(f"table.runs-table a:text-is('{request_id}')").is_visible()
    assert page.locator(".timeline .tl-row.tl-run").count() == 2
    assert page.locator(".timeline .tl-row.tl-model").count() == 2
    shoot(page, "session")


def test_the_usage_page_shows_what_the_api_counts(console: Console, session_runs: list[str]) -> None:
    totals = console.api.get("/api/v1/usage").json()["data"]["totals"]
    page = console.page("/console/usage")
    assert page.locator("#total-runs").inner_text().split()[0] == str(totals["runs_total"])
    assert page.locator("#total-tokens").inner_text().split()[0] == str(totals["tokens"]["total"])
    assert page.locator("table.usage-models td", has_text="echo").count() == 1
    shoot(page, "usage")


def test_the_workflows_page_lists_them_and_a_workflows_page_highlights_its_source_and_activates_a_draft(
        console: Console, session_runs: list[str]) -> None:
    page = console.page("/console/workflows")
    for ref in (console.streams, console.asks, console.fails):
        assert page.locator(f"a[href='/console/workflows/{ref}']").is_visible()
    shoot(page, "workflows")
    page.click(f"a[href='/console/workflows/{console.streams}']")
    page.wait_for_url(re.compile(rf".*/console/workflows/{console.streams}$"), timeout=WAIT_MS)
    source = page.locator(".script-source")
    assert "def execute(ctx: WorkflowContext):" in source.inner_text()
    # Pygments marks keywords (class k, kn for import) server-side: the source is highlighted, not plain text.
    assert source.locator("span.k", has_text="def").count() >= 1 and source.locator("span.kn").count() >= 1
    active = page.locator("#active-version").inner_text()
    mark_page(page)
    draft_row = page.locator(".versions-table tr", has=page.locator(".badge", has_text="draft"))
    draft = draft_row.locator("td a.mono").inner_text()
    assert draft != active
    draft_row.locator("button").click()
    page.wait_for_selector(f"#active-version:text-is('{draft}')", timeout=WAIT_MS)
    assert page.locator("#versions .flash").is_visible() and not_reloaded(page)
    assert console.api.get(f"/api/v1/workflows/{console.streams}").json()["data"]["active_version"] == draft
    shoot(page, "workflow")


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
