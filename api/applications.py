"""Applications: ``PUT|GET|DELETE /api/v1/applications/{name}`` and the list."""
from __future__ import annotations

from flask import Blueprint, jsonify

from flowpool.errors import RequestError
from flowpool.registry import Application
from flowpool.registry.names import is_application_name, is_name

from .parsing import json_body, model_from, page_args, paginated
from .services import authenticate, services

bp = Blueprint("applications", __name__, url_prefix="/api/v1/applications")


def check_name(name: str) -> str:
    """A valid agent name, or a 400."""
    if not is_name(name):
        raise RequestError(f"invalid agent name {name!r}: use 1-64 letters, digits, '_', '-' or '.'", param="name")
    return name


def check_application_name(name: str) -> str:
    """A valid application name, or a 400."""
    if not is_application_name(name):
        raise RequestError(f"invalid application name {name!r}: use 1-64 letters, digits, spaces, '_', '-' or '.', "
                           "starting with a letter or digit and not ending with a space", param="name")
    return name


@bp.put("/<name>")
def put_application(name: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    application = model_from(Application, json_body())
    svc.provider_keys.check(application.key_envs())
    created = svc.applications.put(account.id, check_application_name(name), application)
    return jsonify({"data": {"name": name, **application.model_dump()}}), 201 if created else 200


@bp.get("/<name>")
def get_application(name: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    application = svc.applications.get(account.id, check_application_name(name))
    return jsonify({"data": {"name": name, **application.model_dump()}})


@bp.delete("/<name>")
def delete_application(name: str):  # type: ignore[no-untyped-def]
    """Remove an application (a misspelt name an upload created, say); a 404 when the account has none."""
    svc, account = services(), authenticate()
    svc.applications.delete(account.id, check_application_name(name))
    return jsonify({"data": {"name": name, "deleted": True}})


@bp.get("")
def list_applications():  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    offset, limit = page_args()
    items, total = svc.applications.list(account.id, offset, limit)
    return jsonify(paginated(items, total, offset, limit))
