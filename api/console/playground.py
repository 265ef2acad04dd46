"""The console's playground: pick a workflow, write its input, invoke it and watch the run stream.

``GET /console/playground[?workflow=<ref>][&from=<request_id>]`` renders the
form, each workflow's example input worked out from its INPUT_SCHEMA
(:func:`example_input`), or (``from``) the input or messages of one of the
account's runs. ``GET /console/playground/versions/<ref>`` answers a
workflow's versions for the version select, which the page's script refills
when the workflow changes. ``POST /console/playground/runs`` starts a run
as ``POST /api/v1/runs`` does (:func:`api.runs.start_run`)
and answers where to follow it; the page's script follows the run's console
stream and, when that ends without an answer, asks
``GET /console/playground/runs/<request_id>`` for the run's end.
"""
from __future__ import annotations

import json
from typing import Any

from flask import Response, request

from flowpool.errors import NotFound, RequestError
from flowpool.run import UNENDED, RunRecord

from ..models import MODEL_PATTERN, RunCreateRequest
from ..parsing import json_body, model_from
from ..runs import own_run, start_run, started_headers
from ..services import services
from . import bp
from .common import json_response, render, signed_in
from .workflows import newest_versions

__all__ = ["example_input", "example_text", "version_choices"]

# The select lists at most this many of the account's workflows (oldest first, as the registry lists them).
MAX_WORKFLOWS = 500
# Fields of a playground request; anything else (secrets, webhook_url, stream...) belongs to the API.
_FIELDS = ("workflow", "version", "input", "messages", "session_id")
# The example value of a field with no default, example or enum, by its schema type.
_BY_TYPE: dict[str, Any] = {"string": "", "number": 0, "integer": 0, "boolean": False, "array": [], "object": {}}


def example_input(schema: dict[str, Any] | None) -> dict[str, Any]:
    """An input that fits ``schema`` (an INPUT_SCHEMA: field -> spec), for the caller to edit before invoking.

    Each field takes its spec's ``default``, else its ``example``, else its
    first ``enum`` value, else an empty value of its ``type`` ("" for a
    string, 0 for a number, false, [], {}; null for a type it does not name).
    """
    example: dict[str, Any] = {}
    for field, spec in (schema or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        if "default" in spec:
            value = spec["default"]
        elif "example" in spec:
            value = spec["example"]
        elif isinstance(spec.get("enum"), list) and spec["enum"]:
            value = spec["enum"][0]
        else:
            value = _BY_TYPE.get(str(spec.get("type")))
        # A fresh copy: the empty list and dict above are shared.
        example[str(field)] = json.loads(json.dumps(value))
    return example


def example_text(schema: dict[str, Any] | None) -> str:
    """:func:`example_input` as the textarea shows it: indented JSON."""
    return json.dumps(example_input(schema), indent=2, ensure_ascii=False)


def _choices(workflows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the page's script needs of each workflow to switch the form to it: by ref."""
    return {wf["workflow_ref_name"]: {"example": example_text(wf.get("input_schema")),
                                      "active_version": wf.get("active_version"),
                                      "description": wf.get("description") or ""}
            for wf in workflows}


def version_choices(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The version select's options for ``versions`` (oldest first, as the registry lists them): the active one
    first, as the empty value (a run of the active version, as the API runs one unpinned), then the others newest
    first, drafts marked."""
    def option(version: dict[str, Any], value: str) -> dict[str, Any]:
        marks = [mark for mark in ("active", "draft") if version.get(mark)]
        label = version["version"] + (f" ({', '.join(marks)})" if marks else "")
        return {"value": value, "version": version["version"], "label": label, "active": bool(version.get("active")),
                "draft": bool(version.get("draft"))}
    versions = versions[::-1]
    active = [option(v, "") for v in versions if v.get("active")]
    return active + [option(v, v["version"]) for v in versions if not v.get("active")]


@bp.get("/playground/versions/<ref>")
def versions(ref: str) -> Response:
    """The version select's options for the account's workflow ``ref``, as JSON (404 for none such)."""
    account = signed_in()
    items, total = newest_versions(account.id, ref)
    return json_response({"data": version_choices(items), "total": total})


def _omitted(value: Any) -> str | None:
    """The note the record keeps instead of a value over its limit (api.admission._as_recorded), else None."""
    if isinstance(value, dict) and list(value) == ["omitted"] and isinstance(value["omitted"], str):
        return value["omitted"]
    return None


def _run_input(record: RunRecord) -> tuple[str, str] | str:
    """What the form takes of ``record``: (the field, its JSON text), or why it takes nothing."""
    for field, value in (("input", record.input), ("messages", record.messages)):
        if value is None or (field == "messages" and not value):
            continue
        note = _omitted(value)
        if note is not None:
            return f"its {field} ({note}) {'was' if field == 'input' else 'were'} not kept"
        return field, json.dumps(value, indent=2, ensure_ascii=False)
    return "it was sent no input"


@bp.get("/playground")
def playground() -> Response:
    """The playground form, preselecting ``?workflow=`` when the account has it; ``?from=<request_id>`` fills in
    the input (or messages) of that run of the account's, its workflow selected, and no session id."""
    account = signed_in()
    svc = services()
    wanted = request.args.get("workflow", "")
    source_id = request.args.get("from", "").strip()
    source: RunRecord | None = None
    if source_id:
        try:
            source = own_run(svc, account.id, source_id)
        except NotFound:  # another account's run reads the same as none
            source = None
    workflows, total = svc.workflows.list(account.id, 0, MAX_WORKFLOWS)
    listed = {wf["workflow_ref_name"] for wf in workflows}
    for name in dict.fromkeys([wanted, source.workflow if source else ""]):
        if name and total > len(workflows) and name not in listed:
            try:  # one past the listed ones, asked for by name (a workflow page's "Try it" link, a run's page)
                workflows.append(svc.workflows.get(account.id, name))
            except NotFound:
                pass
    workflows.sort(key=lambda wf: wf["workflow_ref_name"])
    refs = [wf["workflow_ref_name"] for wf in workflows]
    field, notice, taken = "input", "", None
    if source_id and source is None:
        notice = f"You have no run {source_id}: the input below is the workflow's example."
    elif source is not None:
        if source.workflow not in refs:
            notice = f"Run {source_id} ran {source.workflow}, not one of your workflows: the input below is an example."
        else:
            wanted = source.workflow
            taken = _run_input(source)
            if isinstance(taken, str):
                notice = f"Nothing taken from run {source_id}: {taken}. The input below is the workflow's example."
                taken = None
    selected = wanted if wanted in refs else (refs[0] if refs else "")
    current = next((wf for wf in workflows if wf["workflow_ref_name"] == selected), None)
    example = example_text(current.get("input_schema")) if current else "{}"
    if taken is not None:
        field, example = taken
    options = version_choices(newest_versions(account.id, selected)[0]) if selected else []
    return render("console/playground.html", title="Playground", nav="playground", workflows=workflows,
                  total=total, selected=selected, current=current, choices=_choices(workflows),
                  example=example, field=field, versions=options,
                  source=source if taken is not None else None, notice=notice,
                  unknown=wanted if wanted and wanted not in refs else "")


@bp.post("/playground/runs")
def start_playground_run() -> Response:
    """Start a run of the account's workflow: 202 (200 for a cache hit) with where to follow it; an error is the
    API's JSON with its status (the blueprint renders errors of a POST so)."""
    account = signed_in()
    body = _run_request(json_body())
    admission = start_run(services(), account, body, None)  # as POST /api/v1/runs starts one
    request_id = admission.request_id
    response = json_response({"request_id": request_id, "session_id": admission.session_id,
                              "run_url": f"{bp.url_prefix}/runs/{request_id}",
                              "stream_url": f"{bp.url_prefix}/runs/{request_id}/stream"},
                             200 if admission.end is not None else 202)
    response.headers.update(started_headers(admission))
    return response


def _run_request(data: Any) -> RunCreateRequest:
    """The playground's JSON body as the API's run request: ``workflow`` (and ``version``) become its model."""
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise RequestError(f"unknown fields: {', '.join(unknown)}; the playground sends {', '.join(_FIELDS)}",
                           param=unknown[0])
    workflow, version = data.get("workflow"), data.get("version") or None
    if not isinstance(workflow, str) or not workflow:
        raise RequestError("workflow must be the ref name of one of your workflows", param="workflow")
    if version is not None and not isinstance(version, str):
        raise RequestError("version must be a version number like 1.2.0", param="version")
    if not MODEL_PATTERN.match(f"workflow:{workflow}"):
        raise RequestError(f"workflow {workflow[:80]!r} is not a workflow ref name", param="workflow")
    model = f"workflow:{workflow}" + (f"@{version}" if version else "")
    if not MODEL_PATTERN.match(model):
        raise RequestError(f"version must be a version number like 1.2.0, got {str(version)[:40]!r}",
                           param="version")
    fields = {key: data[key] for key in ("input", "messages", "session_id") if data.get(key) is not None}
    # The API's own validation, whose messages name each bad field.
    return model_from(RunCreateRequest, {"model": model, **fields})


@bp.get("/playground/runs/<request_id>")
def run_end(request_id: str) -> Response:
    """The run's status, and its output or error once it has ended: what the page shows when its stream could not."""
    account = signed_in()
    record = own_run(services(), account.id, request_id)
    return json_response({"data": {"request_id": request_id, "status": record.status,
                                   "ended": record.status not in UNENDED, "output": record.output,
                                   "error": record.error, "run_url": f"{bp.url_prefix}/runs/{request_id}"}})
