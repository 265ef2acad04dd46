"""The console's playground: pick a workflow, write its input, invoke it and watch the run stream.

``GET /console/playground[?workflow=<ref>]`` renders the form, each
workflow's example input worked out from its INPUT_SCHEMA
(:func:`example_input`). ``POST /console/playground/runs`` starts a run
through the same admission as ``POST /api/v1/runs`` (:mod:`api.admission`)
and answers where to follow it; the page's script follows the run's console
stream and, when that ends without an answer, asks
``GET /console/playground/runs/<request_id>`` for the run's end.
"""
from __future__ import annotations

import json
from typing import Any

from flask import Response, g, request

from flowpool.errors import NotFound, RequestError
from flowpool.run import RunStatus

from ..admission import admit, submit
from ..models import MODEL_PATTERN, RunCreateRequest
from ..parsing import json_body, model_from
from ..services import services
from . import bp
from .common import json_response, render, signed_in

__all__ = ["example_input", "example_text"]

# The select lists at most this many of the account's workflows (oldest first, as the registry lists them).
MAX_WORKFLOWS = 500
# Fields of a playground request; anything else (secrets, webhook_url, stream...) belongs to the API.
_FIELDS = ("workflow", "version", "input", "messages", "session_id")
# The example value of a field with no default, example or enum, by its schema type.
_BY_TYPE: dict[str, Any] = {"string": "", "number": 0, "integer": 0, "boolean": False, "array": [], "object": {}}
_UNENDED = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)


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


@bp.get("/playground")
def playground() -> Response:
    """The playground form, preselecting ``?workflow=`` when the account has it."""
    account = signed_in()
    svc = services()
    workflows, total = svc.workflows.list(account.id, 0, MAX_WORKFLOWS)
    wanted = request.args.get("workflow", "")
    if wanted and total > len(workflows) and wanted not in {wf["workflow_ref_name"] for wf in workflows}:
        try:  # one past the listed ones, asked for by name (a workflow page's "Try it" link)
            workflows.append(svc.workflows.get(account.id, wanted))
        except NotFound:
            pass
    workflows.sort(key=lambda wf: wf["workflow_ref_name"])
    refs = [wf["workflow_ref_name"] for wf in workflows]
    selected = wanted if wanted in refs else (refs[0] if refs else "")
    current = next((wf for wf in workflows if wf["workflow_ref_name"] == selected), None)
    return render("console/playground.html", title="Playground", nav="playground", workflows=workflows,
                  total=total, selected=selected, current=current, choices=_choices(workflows),
                  example=example_text(current.get("input_schema")) if current else "{}",
                  unknown=wanted if wanted and wanted not in refs else "")


@bp.post("/playground/runs")
def start_run() -> Response:
    """Start a run of the account's workflow: 202 (200 for a cache hit) with where to follow it; an error is the
    API's JSON with its status (the blueprint renders errors of a POST so)."""
    account = signed_in()
    svc = services()
    body = _run_request(json_body())
    admission = admit(svc, account, body)
    if admission.job is not None:
        submit(svc, admission)
    # From here the run may be going: an error must name it (api/errors.py reads this).
    g.handed_over = request_id = admission.request_id
    response = json_response({"request_id": request_id, "session_id": admission.session_id,
                              "run_url": f"{bp.url_prefix}/runs/{request_id}",
                              "stream_url": f"{bp.url_prefix}/runs/{request_id}/stream"},
                             200 if admission.end is not None else 202)
    response.headers["X-Request-Id"] = request_id
    response.headers["X-Cache"] = admission.cache_header
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
    record = services().runs.get(request_id)
    if record is None or record.account != account.id:
        raise NotFound(f"no run with request_id {request_id!r}")
    return json_response({"data": {"request_id": request_id, "status": record.status,
                                   "ended": record.status not in _UNENDED, "output": record.output,
                                   "error": record.error, "run_url": f"{bp.url_prefix}/runs/{request_id}"}})
