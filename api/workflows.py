"""Workflows: upload, validate, list, get, delete, versions, activate, and their recent runs' stats."""
from __future__ import annotations

import base64
import binascii
import time
from typing import Any

from flask import Blueprint, jsonify, request

from flowpool.errors import RequestError
from flowpool.registry import Upload, validate_script
from flowpool.registry.accessories import MB
from flowpool.settings import Settings

from .body import own_body_limit
from .models import Accessory, ActivateRequest, UploadRequest, ValidateRequest
from .parsing import json_body, loads, model_from, page_args, paginated
from .services import authenticate, services

bp = Blueprint("workflows", __name__, url_prefix="/api/v1/workflows")

DEFAULT_SCRIPT = '''\
"""A starter workflow: answer from the conversation, or from `input` when there is one."""
from flowpool_workflow import WorkflowContext

APPLICATION = "default"          # the application whose intents route model calls
INPUT_SCHEMA = {"question": {"type": "string", "description": "Asked when no messages are sent"}}
OUTPUT_SCHEMA = {"answer": {"type": "string"}, "turns": {"type": "integer"}}
TIMEOUT_SECONDS = 60
# Results are cached for an hour by default (even without this line): an identical request gets the
# stored answer without a run. A workflow that fetches the latest data should set 0 (caching off).
CACHE_TTL_SECONDS = 3600


def last_user_message(messages):
    """The text of the latest user turn, if any."""
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return None


def execute(ctx: WorkflowContext):
    question = last_user_message(ctx.messages) or (ctx.input or {}).get("question") or ""
    ctx.log.info("received", turns=len(ctx.messages), session=ctx.session_id)
    ctx.emit("progress", "read the question")
    return {"answer": f"You asked: {question}", "turns": len(ctx.messages)}
'''


# The multipart fields that may carry the script, as the seed documents them: exactly one per upload.
SCRIPT_FILES = ("script_file", "workflow_file", "file")
# Multipart fields that are booleans ("true"/"false", "1"/"0", any case) or JSON (an object, a list).
_FORM_BOOLS = ("publish_version", "allow_inproc_nesting", "transform_enabled")
_FORM_JSON = ("env", "inproc_nested_refs")
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _upload_from_multipart() -> tuple[dict[str, Any], dict[str, bytes]]:
    """The form's fields, and its ``accessory_<key>`` files as bytes (multipart carries them as they are)."""
    form: dict[str, Any] = {k: v for k, v in request.form.items()}
    given = [name for name in SCRIPT_FILES if name in request.files] + (["script"] if "script" in form else [])
    if len(given) > 1:
        raise RequestError(f"the script is given more than once ({' and '.join(given)}): send it in one of script, "
                           f"{', '.join(SCRIPT_FILES)}", param=given[1])
    if given and given[0] != "script":
        try:
            form["script"] = request.files[given[0]].read().decode()
        except UnicodeDecodeError as exc:
            raise RequestError(f"{given[0]} is not UTF-8 text: {exc}", param=given[0]) from exc
    for name in _FORM_JSON:
        if name in form:
            form[name] = loads(form[name], name)
    for name in _FORM_BOOLS:
        if name in form:
            value = form[name].strip().lower()
            if value not in _TRUE + _FALSE:
                raise RequestError(f"{name} must be true or false (or 1 or 0), got {form[name][:20]!r}", param=name)
            form[name] = value in _TRUE
    accessories: dict[str, bytes] = {}
    for name, files in request.files.lists():
        if name.startswith("accessory_"):
            _add_accessory(accessories, name[len("accessory_"):], files[0].read(), given=len(files))
    return form, accessories


def accessories_from_json(given: list[Accessory]) -> dict[str, bytes]:
    """A JSON body's ``accessories: [{key, content_base64}]`` decoded, by key (an upload's, a preview's)."""
    accessories: dict[str, bytes] = {}
    for accessory in given:
        try:
            content = base64.b64decode(accessory.content_base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"accessory {accessory.key[:80]!r}: content_base64 is not base64: {exc}",
                               param="accessories") from exc
        _add_accessory(accessories, accessory.key, content, given=1)
    return accessories


def _add_accessory(accessories: dict[str, bytes], key: str, content: bytes, given: int) -> None:
    if given > 1 or key in accessories:
        raise RequestError(f"accessory {key[:80]!r} is given more than once", param="accessories")
    accessories[key] = content


def upload_limit(settings: Settings) -> int:
    """The body limit of the routes that carry a script and its accessories (FLOWPOOL_MAX_UPLOAD_MB)."""
    return int(settings.max_upload_mb * MB)


# Fields of the seed's upload that flowpool has no counterpart for, and what to do instead; refused when given.
_REFUSED = {
    "application_id": "flowpool names applications and has no numeric ids: send application_name instead",
    "transform_enabled": "flowpool has no transform_session step: shape the input in execute(ctx)",
    "transform_session": "flowpool has no transform_session step: shape the input in execute(ctx)",
    "input_schema": "declare INPUT_SCHEMA in the script",
    "output_schema": "declare OUTPUT_SCHEMA in the script",
}


def _refuse_unsupported(body: UploadRequest | ValidateRequest) -> None:
    """A 400 naming every field of the seed's that asks for something flowpool does not do."""
    given = [name for name in _REFUSED if getattr(body, name, None) not in (None, False)]
    if given:
        raise RequestError("not supported by flowpool: " + "; ".join(f"{name} ({_REFUSED[name]})" for name in given),
                           param=given[0])


def _upload_body() -> tuple[UploadRequest, dict[str, bytes]]:
    """The upload of this request, JSON or multipart, and its accessories by key."""
    if request.mimetype == "multipart/form-data":
        data, accessories = _upload_from_multipart()
        body = model_from(UploadRequest, data)
    else:
        body = model_from(UploadRequest, json_body())
        accessories = accessories_from_json(body.accessories)
    _refuse_unsupported(body)
    return body, accessories


@bp.post("/upload")
@own_body_limit(upload_limit)
def upload():  # type: ignore[no-untyped-def]
    """Store a workflow version: a JSON body (accessories in base64) or multipart (accessories as files)."""
    authenticate()  # before the body is read: a request without a key is a 401, whatever it sends
    return _store(*_upload_body())


@bp.post("")
@own_body_limit(upload_limit)
def create_workflow():  # type: ignore[no-untyped-def]
    """Create a workflow (the seed's POST /workflows): the same as an upload, with the same fields."""
    authenticate()
    return _store(*_upload_body())


def _store(body: UploadRequest, accessories: dict[str, bytes]):  # type: ignore[no-untyped-def]
    """Store an upload and answer with flowpool's fields (workflow, version, created) and the seed's (id,
    workflow_ref_name, published_version, version_created): 201 when it made a version, else 200."""
    svc, account = services(), authenticate()
    stored = svc.workflows.store(account.id, Upload(
        ref=body.workflow_ref_name, script=body.script, description=body.description,
        timeout_seconds=body.timeout_seconds, cache_ttl_seconds=body.cache_ttl_seconds,
        application_name=body.application_name, env=body.env, version_notes=body.version_notes,
        version_bump=body.version_bump, accessories=accessories, queue=body.queue,
        publish_version=body.publish_version, workflow_name=body.workflow_name, execution_mode=body.execution_mode,
        allow_inproc_nesting=body.allow_inproc_nesting, inproc_nested_refs=body.inproc_nested_refs,
    ))
    workflow, published = stored.workflow, stored.published
    return jsonify({"data": {
        "id": workflow["id"],
        "workflow_ref_name": workflow["workflow_ref_name"],
        "workflow_name": workflow["workflow_name"],
        "published_version": None if published is None else {"version_number": published["version"], **published},
        "version_created": stored.created,
        "workflow": workflow, "version": stored.version, "created": stored.created,
    }}), 201 if stored.created else 200


_NO_KIND = {"transform": "transform_session scripts", "schema": "schema expressions apart from a script"}


@bp.post("/validate")
def validate():  # type: ignore[no-untyped-def]
    """Check a script with the rules of an upload: ok, and each problem with its line."""
    svc, _ = services(), authenticate()
    body = model_from(ValidateRequest, json_body())
    if body.kind in _NO_KIND:
        raise RequestError(f"kind {body.kind!r}: flowpool does not have {_NO_KIND[body.kind]}; send kind execute "
                           "(or bundle) with the whole workflow script", param="kind")
    _refuse_unsupported(body)
    result = validate_script(body.code, svc.settings.max_script_bytes)
    return jsonify({"data": {"ok": result.ok, "errors": [p.to_dict() for p in result.problems]}})


@bp.get("/default-script")
def default_script():  # type: ignore[no-untyped-def]
    authenticate()
    return jsonify({"data": {"script": DEFAULT_SCRIPT}})


@bp.get("")
def list_workflows():  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    offset, limit = page_args()
    items, total = svc.workflows.list(account.id, offset, limit)
    return jsonify(paginated(items, total, offset, limit))


@bp.get("/<ref>")
def get_workflow(ref: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    return jsonify({"data": svc.workflows.get(account.id, ref)})


@bp.get("/<ref>/stats")
def workflow_stats(ref: str):  # type: ignore[no-untyped-def]
    """The workflow's runs of the last ``hours`` (1 to 168, default 24): count, errors, latency, hour by hour."""
    svc, account = services(), authenticate()
    raw = request.args.get("hours", "24")
    try:
        hours = int(raw)
    except ValueError:
        hours = 0
    if not 1 <= hours <= 168:
        raise RequestError(f"hours must be a whole number from 1 to 168, got {raw[:40]!r}", param="hours")
    svc.workflows.get(account.id, ref)  # a 404 for a workflow the account does not have
    return jsonify({"data": svc.runs.workflow_stats(account.id, ref, time.time(), hours)})


@bp.delete("/<ref>")
def delete_workflow(ref: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    svc.workflows.delete(account.id, ref)
    return jsonify({"data": {"workflow_ref_name": ref, "deleted": True}})


@bp.get("/<ref>/versions")
def list_versions(ref: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    offset, limit = page_args()
    items, total = svc.workflows.versions(account.id, ref, offset, limit)
    return jsonify(paginated(items, total, offset, limit))


@bp.post("/<ref>/activate")
def activate(ref: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    body = model_from(ActivateRequest, json_body())
    return jsonify({"data": svc.workflows.activate(account.id, ref, body.version)})
