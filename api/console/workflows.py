"""The console's workflows pages: the account's workflows with their last day's runs, one workflow's versions,
script and chart, and activating a version (publishing a draft, rolling back or forward)."""
from __future__ import annotations

import math
import time
from typing import Any
from urllib.parse import quote

from flask import Response, make_response, render_template, request

from flowpool.errors import FlowpoolError, WorkflowNotFound

from ..services import services
from . import bp
from .charts import runs_chart, sparkline, stats_summary
from .common import current_session, render, signed_in
from .highlight import highlight_python

PAGE_SIZE = 50        # workflows per page of the list: their stats are read together
MAX_PAGE = 10 ** 9    # no account has this many pages; a larger ?page= is read as it, then as the last page
VERSIONS_SHOWN = 200  # the newest versions a workflow's page lists


def _stats(account_id: str, ref: str, now: float) -> dict[str, Any]:
    """The workflow's last 24 hours of runs (RunStore.workflow_stats), with its sentence and sparkline."""
    return _with_summary(services().runs.workflow_stats(account_id, ref, now))


def _with_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with its sentence and sparkline."""
    return {**stats, "summary": stats_summary(stats),
            "spark": sparkline([bucket["runs"] for bucket in stats["buckets"]])}


@bp.get("/workflows")
def workflows() -> Response:
    """The account's workflows, oldest first, each with its active version and last day's runs."""
    account = signed_in()
    svc = services()
    page = _page_number(request.args.get("page"))
    items, total = svc.workflows.list(account.id, (page - 1) * PAGE_SIZE, PAGE_SIZE)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    if page > pages:  # past the end (an old link, a typed number): the last page
        page = pages
        items, total = svc.workflows.list(account.id, (page - 1) * PAGE_SIZE, PAGE_SIZE)
        pages = max(1, math.ceil(total / PAGE_SIZE))
    now = time.time()
    stats = svc.runs.workflows_stats(account.id, [item["workflow_ref_name"] for item in items], now)
    rows = [{"workflow": item, "stats": _with_summary(one)} for item, one in zip(items, stats)]
    return render("console/workflows.html", title="Workflows", nav="workflows", rows=rows, total=total,
                  page=page, pages=pages)


def _page_number(text: str | None) -> int:
    """``?page=`` as a page number from 1 to MAX_PAGE (a larger one is MAX_PAGE); anything else is the first page."""
    try:
        return min(MAX_PAGE, max(1, int(text or 1)))
    except ValueError:
        return 1


def newest_versions(account_id: str, ref: str) -> tuple[list[dict[str, Any]], int]:
    """The workflow's newest versions (up to VERSIONS_SHOWN), oldest first, and how many it has in all;
    WorkflowNotFound when the account has no such workflow."""
    registry = services().workflows
    items, total = registry.versions(account_id, ref, 0, VERSIONS_SHOWN)
    if total > VERSIONS_SHOWN:
        items, total = registry.versions(account_id, ref, total - VERSIONS_SHOWN, VERSIONS_SHOWN)
    return items, total


def _versions(account_id: str, ref: str) -> tuple[list[dict[str, Any]], int]:
    """The newest versions (up to VERSIONS_SHOWN), newest first, each marked with the action it offers."""
    items, total = newest_versions(account_id, ref)
    active_at = next((i for i, v in enumerate(items) if v["active"]), None)
    for i, version in enumerate(items):
        # Versions are listed in the order they were made: before the active one is back, after it forward.
        if version["active"]:
            version["action"] = None
        elif version["draft"]:
            version["action"] = "Activate"
        elif active_at is None or i > active_at:
            version["action"] = "Roll forward to"
        else:
            version["action"] = "Roll back to"
    return items[::-1], total


def _versions_context(account_id: str, ref: str) -> dict[str, Any]:
    workflow = services().workflows.get(account_id, ref)
    versions, total = _versions(account_id, ref)
    return {"workflow": workflow, "ref": ref, "versions": versions, "versions_total": total}


def _not_found(ref: str) -> Response:
    """The workflow page's 404: no such workflow for this account (another account's reads the same)."""
    return render("console/workflow.html", title="Workflow not found", nav="workflows", status=404, missing=ref)


@bp.get("/workflows/<ref>")
def workflow(ref: str) -> Response:
    """One workflow: its versions, the script of the version shown, and its last day's runs as a chart."""
    account = signed_in()
    return _workflow_page(account.id, ref, request.args.get("version") or None)


def _workflow_page(account_id: str, ref: str, version: str | None, *, message: str | None = None,
                   error: str | None = None, status: int = 200) -> Response:
    try:
        context = _versions_context(account_id, ref)
    except WorkflowNotFound:
        return _not_found(ref)
    try:
        script = _script_context(account_id, ref, context, version)
    except WorkflowNotFound:
        return render("console/workflow.html", title="Version not found", nav="workflows", status=404,
                      missing=ref, missing_version=version or context["workflow"]["active_version"])
    stats = _stats(account_id, ref, time.time())
    return render("console/workflow.html", title=f"Workflow {ref}", nav="workflows", status=status,
                  stats=stats, chart=runs_chart(stats["buckets"]), message=message, error=error, **script, **context)


def _script_context(account_id: str, ref: str, context: dict[str, Any], version: str | None) -> dict[str, Any]:
    """What the script section shows: ``version``, else the active one, else the newest; WorkflowNotFound when
    the version asked for is not there."""
    versions = context["versions"]
    shown = version or context["workflow"]["active_version"] or (versions[0]["version"] if versions else None)
    meta = next((v for v in versions if v["version"] == shown), None)
    source = services().workflows.load_script(account_id, ref, shown) if shown else None
    return {"shown": shown, "shown_meta": meta, "source": source,
            "script_html": highlight_python(source) if source else None}


@bp.post("/workflows/<ref>/activate")
def activate(ref: str) -> Response:
    """Activate the form's ``version``; htmx gets the versions section back with a message, a plain form the
    whole page. A refusal of the registry is that message, not an error page."""
    account = signed_in()
    number = (request.form.get("version") or "").strip()
    message = error = None
    status = 200
    try:
        if not number:
            error, status = "Choose a version to activate.", 400
        else:
            before = services().workflows.get(account.id, ref)["active_version"]
            services().workflows.activate(account.id, ref, number)
            message = (f"Version {number} is active again." if before == number else
                       f"Version {number} is now active (it was {before or 'draft only'}).")
    except FlowpoolError as exc:
        error, status = exc.message, exc.status
    if request.headers.get("HX-Request") != "true":
        return _workflow_page(account.id, ref, None, message=message, error=error, status=status)
    try:
        context = _versions_context(account.id, ref)
    except WorkflowNotFound:
        context = {"workflow": None, "ref": ref, "versions": [], "versions_total": 0}
    # htmx swaps only 2xx answers, so a refusal comes back as a 200 whose section says what went wrong.
    session = current_session()
    body = render_template("console/_versions.html", message=message, error=error, oob_status=True,
                           csrf_token=session.csrf if session else "", **context)
    replace_url = None
    if message and context["workflow"]:
        # The script section follows: it now shows the version just made active (swapped out of band), and the
        # address drops any ?version= so a reload shows the same.
        try:
            script = _script_context(account.id, ref, context, None)
        except WorkflowNotFound:
            script = None
        if script is not None:
            body += render_template("console/_script.html", oob=True, **script)
            replace_url = f"/console/workflows/{quote(ref, safe='')}"
    response = make_response(body)
    response.headers["Cache-Control"] = "no-store"
    if replace_url:
        response.headers["HX-Replace-Url"] = replace_url
    return response
