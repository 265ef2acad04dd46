"""The web console in a real headless Chromium while runs go: pages that update without a reload, polls that
keep focus and back off, and a run's output list that follows its newest item only while scrolled to the bottom.

Runs that must be seen while they go wait at a gate of the stand-in provider
(``/hold/<gate>``), which the test opens: what the page shows before and
after is checked without any clock.
"""
from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from tests.helpers import eventually

from .conftest import WAIT_MS, WIDTHS, Console, fits_across, gate, gate_name, mark_page, not_reloaded

pytestmark = pytest.mark.slow

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


def polls(page: Any) -> dict[str, Any]:
    """The page's poll counters (COUNT_POLLS)."""
    return page.evaluate("window.__polls")


def test_a_running_runs_page_updates_live_until_it_succeeds(console: Console) -> None:
    hold, let_through = gate(console.provider)
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


def test_the_runs_page_shows_a_new_run_without_a_reload(console: Console) -> None:
    page = console.page("/console/runs")
    mark_page(page)
    request_id = console.start(console.fails, input={})
    link = f"a[href='/console/runs/{request_id}']"
    row = page.locator("#runs-rows tr", has=page.locator(link))
    row.wait_for(timeout=WAIT_MS)
    assert not_reloaded(page)
    assert console.api.ended(request_id)["status"] == "failed"
    page.wait_for_selector(f"#runs-rows tr:has({link}) .badge-failed", timeout=WAIT_MS)
    # The id shows short; its title says it whole.
    assert page.locator(link).inner_text() == request_id[:12] + "…"
    assert page.locator(link).get_attribute("title") == request_id


def test_a_live_run_page_keeps_focus_and_follows_its_newest_output_only_while_scrolled_to_the_bottom(
        console: Console) -> None:
    ref = f"e2e-chatty-{uuid.uuid4().hex[:6]}"
    console.api.upload(ref, CHATTY)
    first, let_first = gate(console.provider)
    second, let_second = gate(console.provider)
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
    assert console.api.ended(request_id)["status"] == "failed"
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
    hold, let_through = gate(console.provider)
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
