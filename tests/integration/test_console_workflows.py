"""The console's workflows, workflow and usage pages over HTTP against the test stack: real uploads, runs and
usage, compared with what the API answers."""
from __future__ import annotations

import html
import re
import uuid
from typing import Any

import pytest
import requests

from flowpool.devstack import Stack

from ..helpers import ECHO_WORKFLOW, FAILING_WORKFLOW, Client, console_session
from ..provider import StandInProvider

ASKS = """
    def execute(ctx):
        resp = ctx.chat.completions.create(application_ref_name="{app}", action_type="answer",
                                           messages=[{{"role": "user", "content": ctx.input["q"]}}])
        return resp["choices"][0]["message"]["content"]
"""

ECHO_V2 = ECHO_WORKFLOW + "\n\n# second cut: <not markup>\n"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _get(session: requests.Session, client: Client, path: str, status: int = 200, **params: str) -> str:
    response = session.get(client.base_url + path, params=params, allow_redirects=False, timeout=60)
    assert response.status_code == status, (response.status_code, response.text[:2000])
    assert response.headers["Content-Type"].startswith("text/html")
    return response.text


def _row(page: str, ref: str) -> str:
    """The table row whose first link is the workflow page of ``ref``."""
    rows = [row for row in page.split("<tr")[1:] if f'href="/console/workflows/{ref}"' in row]
    assert len(rows) == 1, f"{ref} in {len(rows)} rows"
    return rows[0].split("</tr>")[0]


def _cells(row: str) -> list[str]:
    """The text of each cell of a row, tags stripped, spaces squeezed."""
    return [" ".join(html.unescape(re.sub(r"<[^>]+>", " ", cell)).split())
            for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def _by_id(page: str, element_id: str) -> str:
    found = re.search(rf'id="{re.escape(element_id)}"[^>]*>(.*?)</(?:dd|p|strong)>', page, re.S)
    assert found, f"no #{element_id}"
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", found.group(1))).split())


@pytest.fixture(scope="module")
def used(stack: Stack, provider: StandInProvider) -> dict[str, Any]:
    """An account with three workflows and runs of them: echo (two published versions, two runs that succeed),
    fails (one run that fails), asks (one model call), and drafty (a draft only, never run)."""
    assert stack.api_url is not None
    client = Client(stack.api_url, stack.create_account(_name("console-wf")))
    refs = {name: _name(name) for name in ("echo", "fails", "asks", "drafty")}
    app = _name("app")
    put = client.request("PUT", f"/api/v1/applications/{app}",
                         json={"intents": {"answer": {"model": "echo", "base_url": provider.base_url}}})
    assert put.status_code == 201, put.text
    v1 = client.upload(refs["echo"], ECHO_WORKFLOW, version_notes="first cut")["version"]["version"]
    v2 = client.upload(refs["echo"], ECHO_V2, version_notes="second cut & <b>bold</b>")["version"]["version"]
    client.upload(refs["fails"], FAILING_WORKFLOW)
    client.upload(refs["asks"], ASKS.format(app=app))
    client.upload(refs["drafty"], ECHO_WORKFLOW, publish_version=False, version_notes="not yet")
    answers = [client.invoke(refs["echo"], input={"text": "one"}), client.invoke(refs["echo"], input={"text": "two"}),
               client.invoke(refs["fails"]), client.invoke(refs["asks"], input={"q": "where is my parcel"})]
    assert [a.status_code for a in answers] == [200, 200, 500, 200], [a.text for a in answers]
    return {"client": client, "refs": refs, "versions": (v1, v2),
            "console": console_session(stack.api_url, client.key)}


def test_workflows_page_lists_each_workflow_with_its_active_version_and_last_day_of_runs(
        used: dict[str, Any]) -> None:
    client, refs, session = used["client"], used["refs"], used["console"]
    page = _get(session, client, "/console/workflows")
    echo, fails, drafty = (_cells(_row(page, refs[name])) for name in ("echo", "fails", "drafty"))
    # Name, active version, runs, error rate, p50, p95, sparkline.
    assert echo[:4] == [refs["echo"], used["versions"][1], "2", "0.0%"]
    assert echo[4].endswith(("ms", " s")) and echo[5].endswith(("ms", " s"))
    assert fails[:4] == [refs["fails"], "1.0.0", "1", "100.0%"]
    assert drafty[:4] == [refs["drafty"], "draft only", "0", "—"]
    echo_row = _row(page, refs["echo"])
    assert '<svg class="sparkline"' in echo_row and "<polyline points=" in echo_row
    assert "style=" not in page  # the CSP blocks inline styles


def test_workflow_page_shows_versions_notes_highlighted_script_chart_and_links(used: dict[str, Any]) -> None:
    client, refs, session = used["client"], used["refs"], used["console"]
    ref, (v1, v2) = refs["echo"], used["versions"]
    page = _get(session, client, f"/console/workflows/{ref}")
    assert f"<title>Workflow {ref}" in page
    assert _by_id(page, "active-version") == v2
    rows = {version: _cells(_row_of_version(page, ref, version)) for version in (v1, v2)}
    assert rows[v2][2] == "second cut & <b>bold</b>" and "active" in rows[v2][3]
    assert rows[v1][2] == "first cut" and f"Roll back to {v1}" in rows[v1][4]
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page  # notes are escaped
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT[\d:.]+Z" data-local', page)
    # The active version's script, highlighted by Pygments (its class names) with line numbers.
    assert '<div class="highlight">' in page and '<span class="k">def</span>' in page
    assert '<span class="nf">execute</span>' in page and 'href="#L-3"' in page
    assert "# second cut: &lt;not markup&gt;" in page
    assert "/static/pygments.css" in page
    # The chart: an SVG with a title and description, and the same numbers as text beside it.
    assert _by_id(page, "stats-summary").startswith("2 runs, 0 errors (0.0%), p50 ")
    assert '<svg class="chart" id="runs-chart"' in page and '<title id="runs-chart-title">' in page
    assert page.count('class="bar-ok"') >= 1 and "hour (UTC)" in page
    assert f'href="/console/runs?workflow={ref}"' in page and f'href="/console/playground?workflow={ref}"' in page
    # An older version, asked for by number, shows its own script.
    old = _get(session, client, f"/console/workflows/{ref}", version=v1)
    assert "second cut: &lt;not markup&gt;" not in old and '<span class="nf">execute</span>' in old
    _get(session, client, f"/console/workflows/{ref}", 404, version="9.9.9")


def test_a_failing_workflow_chart_counts_its_error(used: dict[str, Any]) -> None:
    client, refs, session = used["client"], used["refs"], used["console"]
    page = _get(session, client, f"/console/workflows/{refs['fails']}")
    assert _by_id(page, "stats-summary").startswith("1 run, 1 error (100.0%)")
    assert 'class="bar-error"' in page


def _row_of_version(page: str, ref: str, version: str) -> str:
    rows = [row for row in page.split("<tr")[1:] if f'href="/console/workflows/{ref}?version={version}"' in row]
    assert len(rows) == 1, f"{version} in {len(rows)} rows"
    return rows[0].split("</tr>")[0]


def _activate(session: requests.Session, client: Client, ref: str, version: str, **headers: str) -> requests.Response:
    return session.post(f"{client.base_url}/console/workflows/{ref}/activate", data={"version": version},
                        headers={"HX-Request": "true", **headers}, allow_redirects=False, timeout=60)


def _active(client: Client, ref: str) -> str | None:
    response = client.get(f"/api/v1/workflows/{ref}")
    assert response.status_code == 200, response.text
    return response.json()["data"]["active_version"]


def test_activating_a_draft_then_rolling_back_and_forward_in_the_console_changes_the_active_version(
        stack: Stack, client: Client) -> None:
    ref = _name("flip")
    v1 = client.upload(ref, ECHO_WORKFLOW, version_notes="stable")["version"]["version"]
    v2 = client.upload(ref, ECHO_V2, publish_version=False, version_notes="candidate")["version"]["version"]
    assert _active(client, ref) == v1
    session = console_session(client.base_url, client.key)
    page = _get(session, client, f"/console/workflows/{ref}")
    assert f"Activate {v2}" in _row_of_version(page, ref, v2)
    assert 'hx-post="/console/workflows/' + ref + '/activate"' in page

    answer = _activate(session, client, ref, v2)
    assert answer.status_code == 200, answer.text
    assert answer.text.lstrip().startswith('<section id="versions"')  # the fragment htmx swaps, not a page
    assert f"Version {v2} is now active" in answer.text and _by_id(answer.text, "active-version") == v2
    assert f"Roll back to {v1}" in answer.text
    assert _active(client, ref) == v2

    answer = _activate(session, client, ref, v1)
    assert answer.status_code == 200 and f"Version {v1} is now active" in answer.text
    assert _active(client, ref) == v1
    assert f"Roll forward to {v2}" in _get(session, client, f"/console/workflows/{ref}")


def test_an_activation_the_registry_refuses_is_a_message_and_changes_nothing(stack: Stack, client: Client) -> None:
    ref = _name("keep")
    v1 = client.upload(ref, ECHO_WORKFLOW)["version"]["version"]
    session = console_session(client.base_url, client.key)
    answer = _activate(session, client, ref, "9.9.9")
    assert answer.status_code == 200, answer.text  # htmx swaps 2xx answers only
    assert 'role="alert"' in answer.text and f"Workflow not found: {ref}@9.9.9" in answer.text
    assert _active(client, ref) == v1
    # Without htmx (a plain form post) the whole page comes back, with the refusal's status.
    plain = session.post(f"{client.base_url}/console/workflows/{ref}/activate", data={"version": "9.9.9"},
                         allow_redirects=False, timeout=60)
    assert plain.status_code == 404 and "<nav" in plain.text and f"{ref}@9.9.9" in plain.text


def test_activation_without_the_csrf_token_is_refused(stack: Stack, client: Client) -> None:
    ref = _name("guard")
    v1 = client.upload(ref, ECHO_WORKFLOW)["version"]["version"]
    v2 = client.upload(ref, ECHO_V2, publish_version=False)["version"]["version"]
    session = console_session(client.base_url, client.key)
    del session.headers["X-CSRF-Token"]
    assert _activate(session, client, ref, v2).status_code == 403
    assert _active(client, ref) == v1


def test_another_accounts_workflow_is_a_404_page_in_the_console(stack: Stack, client: Client) -> None:
    assert stack.api_url is not None
    other = Client(stack.api_url, stack.create_account(_name("other")))
    ref = _name("theirs")
    other.upload(ref, ECHO_V2)
    session = console_session(client.base_url, client.key)
    page = _get(session, client, f"/console/workflows/{ref}", 404)
    assert "<nav" in page and f"This account has no workflow named {ref}" in page
    assert "not markup" not in page
    assert ref not in _get(session, client, "/console/workflows")
    answer = _activate(session, client, ref, "1.0.0")
    assert f"Workflow not found: {ref}" in answer.text
    assert _active(other, ref) == "1.0.0"


def test_a_new_account_sees_how_to_upload_a_workflow_and_that_nothing_was_used(stack: Stack, client: Client) -> None:
    session = console_session(client.base_url, client.key)
    page = _get(session, client, "/console/workflows")
    assert "No workflows yet" in page and "flowpool push examples/echo.py --name echo" in page
    assert 'href="/console/playground"' in page and "<table" not in page
    usage = _get(session, client, "/console/usage")
    assert "Nothing used in these days" in usage and "flowpool invoke echo" in usage
    assert '<svg class="chart"' not in usage


def test_usage_page_shows_the_numbers_the_usage_api_answers(used: dict[str, Any]) -> None:
    client, session = used["client"], used["console"]
    api = client.get("/api/v1/usage")
    assert api.status_code == 200, api.text
    data = api.json()["data"]
    page = _get(session, client, "/console/usage")
    totals = data["totals"]
    assert totals["runs_total"] == 4 and totals["tokens"]["total"] > 0  # what the fixture ran
    assert _by_id(page, "total-runs").split()[0] == str(totals["runs_total"])
    assert "3 succeeded" in _by_id(page, "total-runs") and "1 failed" in _by_id(page, "total-runs")
    assert _by_id(page, "total-compute") == str(totals["compute_seconds"])
    assert _by_id(page, "total-tokens").split()[0] == str(totals["tokens"]["total"])
    assert _by_id(page, "total-cache-hits") == str(totals["cache_hits"])
    for model, tokens in totals["tokens"]["by_model"].items():
        assert re.search(rf'<td class="mono">{re.escape(model)}</td><td class="num">{tokens}</td>', page)
    # The default range is the API's: the last 30 days, one chart slot each.
    assert f"From {data['from']} to {data['to']}" in page
    for chart in ("usage-runs", "usage-compute", "usage-tokens"):
        assert f'<svg class="chart" id="{chart}"' in page
    # One bar of successes for each day with some (the legend's swatch has no <title>).
    days = sum(1 for group in data["groups"] if group["runs"].get("succeeded"))
    assert days >= 1 and len(re.findall(r'<rect class="bar-ok"[^>]*><title>', page)) == days
    limits, today = data["limits"], data["today"]
    tokens_today = _by_id(page, "today-tokens-per-day")
    assert tokens_today.startswith(str(today["tokens"])) or tokens_today.startswith(f"{today['tokens'] / 1000:.1f}")
    assert ("no limit" in tokens_today) == (limits["tokens_per_day"] == 0)


def test_usage_page_for_a_range_of_days_and_a_bad_date(used: dict[str, Any]) -> None:
    client, session = used["client"], used["console"]
    data = client.get("/api/v1/usage").json()["data"]
    today = data["to"]
    page = _get(session, client, "/console/usage", **{"from": today, "to": today})
    assert f"From {today} to {today}" in page
    assert _by_id(page, "total-runs").split()[0] == str(data["totals"]["runs_total"])
    bad = _get(session, client, "/console/usage", 400, **{"from": "yesterday"})
    assert "from must be a day as YYYY-MM-DD, got &#39;yesterday&#39;" in bad and "<nav" in bad
    backwards = _get(session, client, "/console/usage", 400, **{"from": today, "to": "2000-01-01"})
    assert "is after to" in backwards
