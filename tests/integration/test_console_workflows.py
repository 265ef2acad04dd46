"""The console's workflows, workflow and usage pages over HTTP against the test stack: real uploads, runs and
usage, compared with what the API answers."""
from __future__ import annotations

import html
import re
import uuid
from datetime import datetime, timezone
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
    assert '<span class="nf">execute</span>' in page and '<a id="L-3" name="L-3"></a>' in page
    assert 'href="#L-' not in page  # line numbers are no Tab stops
    assert "# second cut: &lt;not markup&gt;" in page
    assert "/static/pygments.css" in page
    # The chart: an SVG with a title and description, and the same numbers as text beside it.
    assert _by_id(page, "stats-summary").startswith("2 runs, 0 errors (0.0%), p50 ")
    assert '<svg class="chart" id="runs-chart"' in page and '<title id="runs-chart-title">' in page
    assert page.count('class="bar-ok"') >= 1 and "hour (UTC)" in page
    # Its hours are UTC text carrying their moment, which console.js shows in the viewer's zone and says so.
    stamps = re.findall(r'<text [^>]*data-local="hour" data-ts="([\d.]+)">(\d\d:\d\d)</text>', page)
    assert len(stamps) == 6 and all(
        datetime.fromtimestamp(float(ts), timezone.utc).strftime("%H:%M") == label for ts, label in stamps)
    assert 'data-local-label="hour (your time)">hour (UTC)</span>' in page
    assert re.search(r'<title data-local="hour" data-ts="[\d.]+" data-after=": succeeded \d+">', page)
    # The chart's numbers are text too: a table of the 24 hours, newest first, each hour a <time> the viewer's
    # clock shows, with its runs, errors and latencies: the same numbers as the chart's bars.
    table = re.search(r'<details class="chart-table" id="hourly-numbers">\s*<summary>Hourly numbers</summary>(.*?)'
                      r'</details>', page, re.S)
    assert table, "no hourly numbers"
    rows = re.findall(r"<tr><td>(.*?)</td>(.*?)</tr>", table.group(1), re.S)
    assert len(rows) == 24 and all('data-local="compact"' in hour for hour, _ in rows)
    by_hour = {re.search(r'datetime="([^"]+)"', hour).group(1): _cells(rest) for hour, rest in rows}
    bars = re.findall(r'<title data-local="hour" data-ts="([\d.]+)" data-after=": succeeded (\d+)">', page)
    assert bars
    for ts, succeeded in bars:
        moment = datetime.fromtimestamp(float(ts), timezone.utc)
        iso = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        assert by_hour[iso][:2] == [succeeded, "0"] and by_hour[iso][2].endswith(("ms", " s")), by_hour[iso]
    assert sum(int(cells[0]) for cells in by_hour.values()) == 2
    assert list(by_hour)[0] > list(by_hour)[-1]  # newest first
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
    hours = re.search(r'id="hourly-numbers">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert hours and [_cells(row)[1:3] for row in re.findall(r"<tr>(.*?)</tr>", hours.group(1), re.S)
                      if _cells(row)[1:3] != ["0", "0"]] == [["1", "1"]]


def _versions_and_status(page: str) -> tuple[str, str]:
    """The versions section and the status region (its whole element) of a page or an activation's answer."""
    section = re.search(r'<section id="versions".*?</section>', page, re.S)
    status = re.search(r'<div id="versions-status".*?</div>', page, re.S)
    assert section and status, page[:2000]
    assert not (section.start() < status.start() < section.end()), "the status region is inside the section"
    return section.group(0), status.group(0)


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
    # One keypress must not change what new runs use: each activation asks first.
    assert (f'hx-confirm="Make {v2} the active version of {ref}? New runs will use it instead of {v1}."'
            in _row_of_version(page, ref, v2))
    # The page's status region is outside the section htmx replaces, empty until an activation.
    versions, status = _versions_and_status(page)
    assert re.fullmatch(r'<div id="versions-status" class="versions-status" role="status" aria-live="polite">\s*'
                        r'</div>', status)

    answer = _activate(session, client, ref, v2)
    assert answer.status_code == 200, answer.text
    assert answer.text.lstrip().startswith('<section id="versions"')  # the fragment htmx swaps, not a page
    assert _by_id(answer.text, "active-version") == v2 and f"Roll back to {v1}" in answer.text
    assert _active(client, ref) == v2
    # The message goes out of band into the page's own status region, which stays: a screen reader hears it.
    versions, status = _versions_and_status(answer.text)
    assert "is now active" not in versions
    assert status.startswith('<div id="versions-status" class="versions-status" role="status" aria-live="polite" '
                             'hx-swap-oob="innerHTML">')
    # Focus goes to the message (the button pressed is gone with the section it was in).
    assert (f'<p class="flash" id="versions-message" tabindex="-1" data-focus-after-swap>Version {v2} is now active'
            in status)

    answer = _activate(session, client, ref, v1)
    assert answer.status_code == 200 and f"Version {v1} is now active" in _versions_and_status(answer.text)[1]
    assert f'hx-confirm="Make {v2} the active version of {ref}? New runs will use it instead of {v1}."' in answer.text
    assert _active(client, ref) == v1
    assert f"Roll forward to {v2}" in _get(session, client, f"/console/workflows/{ref}")


def test_activating_a_version_in_the_console_also_shows_its_script(stack: Stack, client: Client) -> None:
    ref = _name("script")
    v1 = client.upload(ref, ECHO_WORKFLOW, version_notes="stable")["version"]["version"]
    v2 = client.upload(ref, ECHO_V2, publish_version=False, version_notes="candidate")["version"]["version"]
    session = console_session(client.base_url, client.key)
    page = _get(session, client, f"/console/workflows/{ref}")
    assert f'Script of version <span class="mono">{v1}</span>' in page and "second cut" not in page
    # Not run yet: the chart's section says how to start a run, with working links.
    assert _by_id(page, "stats-summary") == "No runs in the last 24 hours"
    quiet = _by_id(page, "stats-empty")
    assert f"flowpool invoke {ref} --input '{{}}'" in quiet
    assert f'<a href="/console/playground?workflow={ref}">Playground</a>' in page

    answer = _activate(session, client, ref, v2)
    assert answer.status_code == 200, answer.text
    # After the versions section htmx swaps, the script section comes out of band, with the new active script.
    versions, script = answer.text.split('<section id="script"', 1)
    assert "second cut" not in versions
    assert script.startswith(' class="script" aria-labelledby="script-heading" hx-swap-oob="true">')
    assert f'Script of version <span class="mono">{v2}</span>' in script and "candidate" in script
    assert "# second cut: &lt;not markup&gt;" in script and '<div class="highlight">' in script
    assert answer.headers["HX-Replace-Url"] == f"/console/workflows/{ref}"  # a reload shows the same version
    # A refusal leaves the script section as it is.
    refused = _activate(session, client, ref, "9.9.9")
    assert 'id="script"' not in refused.text and "HX-Replace-Url" not in refused.headers


def test_an_activation_the_registry_refuses_is_a_message_and_changes_nothing(stack: Stack, client: Client) -> None:
    ref = _name("keep")
    v1 = client.upload(ref, ECHO_WORKFLOW)["version"]["version"]
    session = console_session(client.base_url, client.key)
    answer = _activate(session, client, ref, "9.9.9")
    assert answer.status_code == 200, answer.text  # htmx swaps 2xx answers only
    status = _versions_and_status(answer.text)[1]
    assert 'class="error-message" id="versions-message" tabindex="-1"' in status
    assert f"Workflow not found: {ref}@9.9.9" in status
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


def test_a_workflows_timeout_reads_in_whole_seconds(stack: Stack, client: Client) -> None:
    ref = _name("timed")
    client.upload(ref, "TIMEOUT_SECONDS = 60\n\n\ndef execute(ctx):\n    return 1\n")
    page = _get(console_session(client.base_url, client.key), client, f"/console/workflows/{ref}")
    assert "<dt>Timeout</dt><dd>60 s</dd>" in page  # not "60.0 s"


def test_a_page_number_past_the_end_shows_the_last_page(stack: Stack, client: Client) -> None:
    ref = _name("paged")
    client.upload(ref, ECHO_WORKFLOW)
    session = console_session(client.base_url, client.key)
    for number in ("2", "99999999999999999999"):
        page = _get(session, client, "/console/workflows", page=number)
        assert f'href="/console/workflows/{ref}"' in page, number


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
    assert f"UTC days {data['from']} to {data['to']}" in page
    # Its days are UTC days (the API's), and the page says so, with when today began in the viewer's time.
    utc_days = re.search(r'<p class="hint" id="utc-days">(.*?)</p>', page, re.S)
    assert utc_days and "UTC day" in utc_days.group(1)
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT00:00:00.000Z" data-local="time"', utc_days.group(1))
    assert '<th scope="col">UTC day</th>' in page and 'class="chart-x-label">UTC day</span>' in page
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
    assert f"UTC days {today} to {today}" in page
    assert _by_id(page, "total-runs").split()[0] == str(data["totals"]["runs_total"])
    bad = _get(session, client, "/console/usage", 400, **{"from": "yesterday"})
    assert "from must be a day as YYYY-MM-DD, got &#39;yesterday&#39;" in bad and "<nav" in bad
    backwards = _get(session, client, "/console/usage", 400, **{"from": today, "to": "2000-01-01"})
    assert "is after to" in backwards
