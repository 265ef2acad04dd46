"""The workflow page and the playground in a real headless Chromium: what a keyboard and screen-reader user meets.

Activating a version asks first and leaves focus on what it did; a script's
line numbers are no Tab stops; the chart's numbers read as a table in the
viewer's zone; the playground stays usable while it follows a run, lists a
workflow's versions, and says what went wrong in plain words. Runs that must
be seen while they go wait at a gate of the stand-in provider (``/hold/<gate>``),
which the test opens; assertions are on content and focus, never on pixels.
"""
from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Any, Iterator
from urllib.parse import quote
from zoneinfo import ZoneInfo

import pytest
import requests

from flowpool.devstack import Stack
from tests.helpers import Client, eventually
from tests.provider import StandInProvider

from .conftest import TIMEZONE, WAIT_MS, gate, new_context, open_page, sign_in

pytestmark = pytest.mark.slow

# Waits at its gate before anything else, so a followed run shows nothing until the test lets it through.
HOLDS = """
    from flowpool_workflow import WorkflowContext

    INPUT_SCHEMA = {
        "topic": {"type": "string", "description": "What the step is about"},
        "hold": {"type": "string", "description": "A URL that answers once the caller lets the run go on"},
    }
    CACHE_TTL_SECONDS = 0
    TIMEOUT_SECONDS = 60


    def execute(ctx: WorkflowContext):
        ctx.http.get(ctx.input["hold"])
        ctx.log.info("let through", topic=ctx.input["topic"])
        ctx.emit("step", ctx.input["topic"])
        return {"topic": ctx.input["topic"]}
"""

NEEDS_Q = """
    INPUT_SCHEMA = {"q": {"type": "string", "description": "The question", "required": True}}
    CACHE_TTL_SECONDS = 0


    def execute(ctx):
        return {"q": ctx.input["q"]}
"""

FAILS = """
    CACHE_TTL_SECONDS = 0


    def execute(ctx):
        raise ValueError("the page test fails on purpose")
"""

# A script long enough that links on its line numbers would be hundreds of Tab stops.
LONG = "CACHE_TTL_SECONDS = 0\n" + "".join(f"STEP_{n} = {n}\n" for n in range(1, 301)) + """

def execute(ctx):
    return {"steps": 300}
"""

FOCUSABLE = "a[href], button, input, select, textarea, [tabindex]:not([tabindex='-1'])"


class Pages:
    """The module's account, its workflows, and a browser context signed in to the console."""

    def __init__(self, base_url: str, api: Client, context: Any, provider: StandInProvider, suffix: str) -> None:
        self.base_url = base_url
        self.api = api
        self.context = context
        self.provider = provider
        self.flip, self.holds, self.needs_q = f"pg-flip-{suffix}", f"pg-holds-{suffix}", f"pg-needs-q-{suffix}"
        self.fails, self.long, self.pick = f"pg-fails-{suffix}", f"pg-long-{suffix}", f"pg-pick-{suffix}"

    def page(self, path: str) -> Any:
        """A new tab at ``path``, loaded."""
        return open_page(self.context, self.base_url, path)

    def active(self, ref: str) -> str:
        response = self.api.get(f"/api/v1/workflows/{ref}")
        assert response.status_code == 200, response.text
        return response.json()["data"]["active_version"]


@pytest.fixture(scope="module")
def pages(stack: Stack, browser: Any, provider: StandInProvider) -> Iterator[Pages]:
    """A fresh account with the module's workflows, signed in to the console in a Tokyo browser context."""
    assert stack.api_url is not None
    suffix = uuid.uuid4().hex[:6]
    api = Client(stack.api_url, stack.create_account(f"pg-{suffix}"))
    context = new_context(browser)
    try:
        p = Pages(stack.api_url, api, context, provider, suffix)
        api.upload(p.flip, "def execute(ctx):\n    return {'v': 1}\n", version_notes="stable")
        api.upload(p.flip, "def execute(ctx):\n    return {'v': 2}\n", publish_version=False, version_notes="next")
        api.upload(p.pick, "def execute(ctx):\n    return {'v': 1}\n")
        api.upload(p.pick, "def execute(ctx):\n    return {'v': 2}\n", publish_version=False)
        api.upload(p.holds, HOLDS, version_notes="first")
        api.upload(p.holds, HOLDS + "\n    # second\n", version_notes="second")  # now the active version
        api.upload(p.needs_q, NEEDS_Q)
        api.upload(p.fails, FAILS)
        api.upload(p.long, LONG)
        sign_in(context, stack.api_url, api.key)
        yield p
    finally:
        context.close()


def focused(page: Any) -> dict[str, Any]:
    """The focused element: its id, text, whether it is inside #versions, and its live region's id."""
    return page.evaluate("""() => {
        const el = document.activeElement;
        const region = el.closest('[role=status]');
        return {id: el.id, text: el.textContent.trim(), inVersions: Boolean(el.closest('#versions')),
                region: region ? region.id : null};
    }""")


def test_activating_asks_first_and_then_focuses_the_message_in_a_status_region_that_stays(pages: Pages) -> None:
    page = pages.page(f"/console/workflows/{pages.flip}")
    dialogs: list[str] = []
    # The status region is one element for the page's life: an out-of-band swap fills it, never replaces it.
    page.evaluate("document.getElementById('versions-status').__kept = 'same element'")

    def dismiss(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    page.click("#versions button:has-text('Activate 1.1.0')")
    assert dialogs == [f"Make 1.1.0 the active version of {pages.flip}? New runs will use it instead of 1.0.0."]
    assert page.locator("#active-version").inner_text() == "1.0.0" and pages.active(pages.flip) == "1.0.0"
    assert page.locator("#versions-status").inner_text().strip() == ""

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.click("#versions button:has-text('Activate 1.1.0')")
    page.wait_for_selector("#active-version:text-is('1.1.0')", timeout=WAIT_MS)
    page.wait_for_function("() => document.activeElement.id === 'versions-message'")  # focus on the message
    assert focused(page) == {"id": "versions-message", "text": "Version 1.1.0 is now active (it was 1.0.0).",
                             "inVersions": False, "region": "versions-status"}
    assert pages.active(pages.flip) == "1.1.0"
    # Rolling back by keyboard asks too, and the message is focused again in the same region.
    button = page.locator("#versions button:has-text('Roll back to 1.0.0')")
    button.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#active-version:text-is('1.0.0')", timeout=WAIT_MS)
    page.wait_for_function("() => document.activeElement.textContent.includes('Version 1.0.0')")  # the new message
    assert dialogs[-1] == f"Make 1.0.0 the active version of {pages.flip}? New runs will use it instead of 1.1.0."
    assert focused(page)["region"] == "versions-status" and pages.active(pages.flip) == "1.0.0"
    assert page.evaluate("document.getElementById('versions-status').__kept") == "same element"
    assert page.locator("#versions-status p").count() == 1


def test_a_scripts_line_numbers_are_no_tab_stops_but_a_line_can_be_linked(pages: Pages) -> None:
    page = pages.page(f"/console/workflows/{pages.long}#L-150")
    source = page.locator(".script-source")
    assert "STEP_300 = 300" in source.inner_text()
    assert source.locator(FOCUSABLE).count() == 0
    assert page.locator(".script-source td.linenos").inner_text().split()[:3] == ["1", "2", "3"]
    # The address's line is there to scroll to: the page's :target is that line's anchor.
    assert page.evaluate("document.querySelector(':target') && document.querySelector(':target').id") == "L-150"
    assert "STEP_149 = 149" in page.evaluate("document.getElementById('L-150').parentNode.textContent")


def test_the_hourly_numbers_table_shows_each_hour_in_the_viewers_zone(pages: Pages) -> None:
    assert pages.api.invoke(pages.needs_q, input={"q": "one"}).status_code == 200
    page = pages.page(f"/console/workflows/{pages.needs_q}")
    table = page.locator("#hourly-numbers")
    assert table.locator("tbody tr").first.is_hidden()  # folded until asked for
    table.locator("summary").click()
    rows = table.locator("tbody tr")
    assert rows.count() == 24
    assert table.locator("[data-local-zone]").inner_text() == f"({TIMEZONE})"
    newest = rows.first.locator("time")
    moment = datetime.fromisoformat(newest.get_attribute("datetime").replace("Z", "+00:00"))
    local = moment.astimezone(ZoneInfo(TIMEZONE))
    assert f"{local.hour % 12 or 12}:{local:%M:%S}" in newest.inner_text()
    assert TIMEZONE in newest.get_attribute("title")
    assert sum(int(rows.nth(n).locator("td").nth(1).inner_text()) for n in range(24)) == 1
    assert rows.first.locator("td").nth(1).inner_text() == "1"  # newest first: the run just made


def run_id(page: Any) -> str:
    return page.locator("#playground-run-link").inner_text()


def invoke(page: Any, value: Any) -> None:
    page.fill("#playground-input", json.dumps(value))
    page.click("#playground-invoke")


def test_the_playground_can_invoke_again_or_stop_following_while_a_run_goes(pages: Pages) -> None:
    page = pages.page(f"/console/playground?workflow={pages.holds}")
    hold1, open1 = gate(pages.provider)
    invoke(page, {"topic": "first", "hold": hold1})
    page.wait_for_selector("#playground-run-link:text-matches('^req_')", timeout=WAIT_MS)
    first = run_id(page)
    eventually(lambda: pages.api.run(first)["status"] == "running", timeout=30, what="the first run to start")
    # Held before any output: no bare "Chunks"/"Log lines" headings over empty lists; the form stays usable.
    assert page.locator("#playground-chunks-box").is_hidden() and page.locator("#playground-logs-box").is_hidden()
    assert page.locator("#playground-invoke").is_enabled() and page.locator("#playground-stop").is_visible()
    # Invoke again: the first run is no longer followed, the new one is.
    hold2, open2 = gate(pages.provider)
    invoke(page, {"topic": "second", "hold": hold2})
    # The second run is followed.
    page.wait_for_function(f"() => document.getElementById('playground-run-link').textContent.startsWith('req_') && "
                           f"document.getElementById('playground-run-link').textContent !== {json.dumps(first)}")
    second = run_id(page)
    requests.post(open1, timeout=10)
    assert pages.api.ended(first)["status"] == "succeeded"
    requests.post(open2, timeout=10)
    page.wait_for_selector("#playground-output-box:not([hidden])", timeout=WAIT_MS)
    assert json.loads(page.locator("#playground-output").inner_text()) == {"topic": "second"}
    assert run_id(page) == second
    assert page.locator("#playground-chunks li").all_inner_texts() == ["step: second"]  # none of the first run's
    page.wait_for_selector("#playground-run-status:text-is('succeeded')", timeout=WAIT_MS)
    assert page.locator("#playground-stop").is_hidden()
    # Each log line starts with its time, in the viewer's zone (the full moment and zone in its title).
    log_time = page.locator("#playground-logs li time").first
    moment = datetime.fromisoformat(log_time.get_attribute("datetime").replace("Z", "+00:00"))
    local = moment.astimezone(ZoneInfo(TIMEZONE))
    assert f"{local.hour % 12 or 12}:{local:%M:%S}" in log_time.inner_text()
    assert TIMEZONE in log_time.get_attribute("title")
    assert "let through" in page.locator("#playground-logs li").first.inner_text()
    # Stop following: the form is free at once, focus on Invoke, and the run goes on without the page.
    hold3, open3 = gate(pages.provider)
    invoke(page, {"topic": "third", "hold": hold3})
    page.wait_for_selector("#playground-stop:not([hidden])", timeout=WAIT_MS)
    page.wait_for_function("() => document.getElementById('playground-run-link').textContent !== "
                           f"{json.dumps(second)}")  # the third run is followed
    third = run_id(page)
    page.click("#playground-stop")
    assert page.locator("#playground-stop").is_hidden()
    assert page.evaluate("document.activeElement.id") == "playground-invoke"
    assert "Stopped following" in page.locator("#playground-status").inner_text()
    requests.post(open3, timeout=10)
    assert pages.api.ended(third)["status"] == "succeeded"
    assert page.locator("#playground-run-status").inner_text() == "running"  # no longer followed


def test_the_playground_lists_the_workflows_versions_and_runs_the_one_picked(pages: Pages) -> None:
    page = pages.page(f"/console/playground?workflow={pages.holds}")
    options = page.locator("#playground-version option")
    assert options.all_inner_texts() == ["1.1.0 (active)", "1.0.0"]
    # Another workflow: the select is refilled with its versions.
    page.select_option("#playground-workflow", pages.pick)
    # The versions of the workflow picked fill the select.
    page.wait_for_function("() => document.querySelector('#playground-version option') && "
                           "document.querySelector('#playground-version option').textContent === '1.0.0 (active)'")
    assert options.all_inner_texts() == ["1.0.0 (active)", "1.1.0 (draft)"]
    # A draft picked is the version run.
    page.select_option("#playground-version", "1.1.0")
    invoke(page, {})
    page.wait_for_selector("#playground-output-box:not([hidden])", timeout=WAIT_MS)
    assert json.loads(page.locator("#playground-output").inner_text()) == {"v": 2}
    assert pages.api.run(run_id(page))["version"] == "1.1.0"


def test_the_playground_says_what_went_wrong_in_plain_words(pages: Pages) -> None:
    page = pages.page(f"/console/playground?workflow={pages.needs_q}")
    invoke(page, {})
    problem = page.locator("#playground-input-error")
    page.wait_for_selector("#playground-input-error:not([hidden])", timeout=WAIT_MS)
    assert "error" not in problem.inner_text().split(":")[0]  # the message, not "invalid_request_error: ..."
    assert "q" in problem.inner_text() and problem.get_attribute("title") == "invalid_request_error"
    # A run that fails: its message, the error's type as a small label beside the heading.
    page.select_option("#playground-workflow", pages.fails)
    invoke(page, {})
    page.wait_for_selector("#playground-error-box:not([hidden])", timeout=WAIT_MS)
    error = pages.api.ended(run_id(page))["error"]
    assert page.locator("#playground-error").inner_text() == error["message"]
    label = page.locator("#playground-error-type")
    assert label.is_visible() and label.get_attribute("title") in (error.get("type"), error.get("kind"))
    assert label.get_attribute("title") not in page.locator("#playground-error").inner_text()
    assert "the page test fails on purpose" in page.locator("#playground-error-box").inner_text()


def test_when_the_console_session_has_ended_the_playground_links_to_sign_in_again(
        pages: Pages, browser: Any) -> None:
    context = new_context(browser)
    try:
        sign_in(context, pages.base_url, pages.api.key)
        page = context.new_page()
        path = f"/console/playground?workflow={pages.needs_q}"
        page.goto(pages.base_url + path, wait_until="load", timeout=WAIT_MS)
        context.clear_cookies()  # the session's cookie gone, as after a sign-out elsewhere or its end
        invoke(page, {"q": "anyone there"})
        link = page.locator("#playground-status a")
        link.wait_for(timeout=WAIT_MS)
        assert link.inner_text() == "Sign in again"
        assert link.get_attribute("href") == "/console/sign-in?next=" + quote(path, safe="")
        link.click()
        page.wait_for_url(re.compile(r".*/console/sign-in\?next="), timeout=WAIT_MS)
        assert page.locator("#api_key").is_visible()
    finally:
        context.close()
