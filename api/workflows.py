"""Workflows: upload, validate, list, get, delete, versions, activate."""
from __future__ import annotations

import base64
import binascii
from typing import Any

from flask import Blueprint, jsonify, request

from flowpool.errors import RequestError
from flowpool.registry import Upload, validate_script
from flowpool.registry.accessories import MB
from flowpool.settings import Settings

from .body import own_body_limit
from .models import ActivateRequest, UploadRequest, ValidateRequest
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


def _upload_from_multipart() -> tuple[dict[str, Any], dict[str, bytes]]:
    """The form's fields, and its ``accessory_<key>`` files as bytes (multipart carries them as they are)."""
    form: dict[str, Any] = {k: v for k, v in request.form.items()}
    script_file = request.files.get("script_file")
    if script_file is not None:
        try:
            form["script"] = script_file.read().decode()
        except UnicodeDecodeError as exc:
            raise RequestError(f"script_file is not UTF-8 text: {exc}", param="script_file") from exc
    if "env" in form:
        form["env"] = loads(form["env"], "env")
    accessories: dict[str, bytes] = {}
    for name, files in request.files.lists():
        if name.startswith("accessory_"):
            _add_accessory(accessories, name[len("accessory_"):], files[0].read(), given=len(files))
    return form, accessories


def _accessories_from_json(body: UploadRequest) -> dict[str, bytes]:
    """The body's ``accessories: [{key, content_base64}]`` decoded, by key."""
    accessories: dict[str, bytes] = {}
    for accessory in body.accessories:
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


def _upload_limit(settings: Settings) -> int:
    return int(settings.max_upload_mb * MB)


@bp.post("/upload")
@own_body_limit(_upload_limit)
def upload():  # type: ignore[no-untyped-def]
    """Store a workflow version: a JSON body (accessories in base64) or multipart (accessories as files)."""
    svc, account = services(), authenticate()
    if request.mimetype == "multipart/form-data":
        data, accessories = _upload_from_multipart()
        body = model_from(UploadRequest, data)
    else:
        body = model_from(UploadRequest, json_body())
        accessories = _accessories_from_json(body)
    workflow, version, created = svc.workflows.upload(account.id, Upload(
        ref=body.workflow_ref_name, script=body.script, description=body.description,
        timeout_seconds=body.timeout_seconds, cache_ttl_seconds=body.cache_ttl_seconds,
        application_name=body.application_name, env=body.env, version_notes=body.version_notes,
        version_bump=body.version_bump, accessories=accessories, queue=body.queue,
    ))
    return jsonify({"data": {"workflow": workflow, "version": version, "created": created}}), 201 if created else 200


@bp.post("/validate")
def validate():  # type: ignore[no-untyped-def]
    svc, _ = services(), authenticate()
    body = model_from(ValidateRequest, json_body())
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
