"""A running run's page in a real headless Chromium: a model call shows on the timeline as it starts, as a bar
growing to now marked in progress, and as the record keeps it once it ended; all without a reload.

The run waits at two gates of the stand-in provider: first an HTTP one (``/hold/<gate>``, before any model call),
then a held model (``hold-<gate>``); the test opens each, so what the page shows before and after is checked
without any clock. The page, a call in progress, is saved as ``run-live-call.png`` with the other screenshots.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from flowpool.devstack import Stack
from tests.helpers import Client, eventually
from tests.provider import StandInProvider

from .conftest import WAIT_MS, gate, gate_name, mark_page, new_context, not_reloaded, open_page, shoot, sign_in

pytestmark = pytest.mark.slow

HOLDS_THEN_ASKS = """
    APPLICATION = "{app}"

    def execute(ctx):
        ctx.http.get(ctx.input["first"])
        resp = ctx.chat.completions.create(intent="answer", model=ctx.input["model"],
                                           messages=[{{"role": "user", "content": "live"}}])
        return resp["choices"][0]["message"]["content"]
"""


class LiveConsole:
    """A fresh account with the workflow, and a browser context signed in to the console."""

    def __init__(self, base_url: str, api: Client, context: Any, ref: str) -> None:
        self.base_url, self.api, self.context, self.ref = base_url, api, context, ref


@pytest.fixture(scope="module")
def live_console(stack: Stack, browser: Any, provider: StandInProvider) -> Iterator[LiveConsole]:
    assert stack.api_url is not None
    suffix = uuid.uuid4().hex[:6]
    api = Client(stack.api_url, stack.create_account(f"e2e-live-{suffix}"))
    app, ref = f"e2e-live-app-{suffix}", f"e2e-live-{suffix}"
    put = api.request("PUT", f"/api/v1/applications/{app}",
                      json={"intents": {"answer": {"model": "echo", "base_url": provider.base_url}}})
    assert put.status_code == 201, put.text
    api.upload(ref, HOLDS_THEN_ASKS.format(app=app))
    context = new_context(browser)
    try:
        sign_in(context, stack.api_url, api.key)
        yield LiveConsole(stack.api_url, api, context, ref)
    finally:
        context.close()


def test_the_run_page_shows_a_held_model_call_live_then_finished_without_reload(
        live_console: LiveConsole, provider: StandInProvider, screenshots: Path) -> None:
    hold, _ = gate(provider)
    first, model_gate = gate_name(hold), uuid.uuid4().hex
    response = live_console.api.post("/api/v1/runs", json={"model": f"workflow:{live_console.ref}", "input": {
        "first": hold, "model": f"hold-{model_gate}"}})
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    eventually(lambda: provider.held(first) == 1, timeout=30, what="the run to wait at its first gate")

    page = open_page(live_console.context, live_console.base_url, f"/console/runs/{request_id}")
    mark_page(page)
    timeline = page.locator(".run-timeline")
    assert timeline.locator(".tl-row.tl-model").count() == 0  # no model call yet
    assert "in progress" in page.locator(".tl-legend").inner_text()

    provider.open_gate(first)  # the model call starts, and waits at its own gate
    eventually(lambda: provider.held(model_gate) == 1, timeout=30, what="the model call to wait at its gate")
    held = timeline.locator(".tl-row.tl-model")
    held.locator("rect.tl-seg-call-running").wait_for(timeout=WAIT_MS)  # the polled detail brought it in
    assert held.locator(".tl-name").inner_text() == f"model hold-{model_gate}"
    assert held.locator(".tl-meta").inner_text().startswith("running")
    row = page.locator("table.calls tr.call-row.call-running")
    assert row.count() == 1 and "running" in row.locator(".badge").inner_text()
    shoot(page, screenshots, "run-live-call")

    provider.open_gate(model_gate)
    page.wait_for_selector(".run-status-line .badge-succeeded", timeout=WAIT_MS)
    done = timeline.locator(".tl-row.tl-model")
    assert done.count() == 1 and done.locator("rect.tl-seg-call").count() == 1
    assert page.locator("rect.tl-seg-call-running").count() == 0
    assert done.locator(".tl-meta").inner_text().startswith("ok")
    assert page.locator("table.calls tr.call-row.call-running").count() == 0
    assert not_reloaded(page)
