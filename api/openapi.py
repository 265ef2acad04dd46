"""``GET /openapi.json``: the API described from its routes and its pydantic request models."""
from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, current_app, jsonify
from pydantic import BaseModel

import flowpool
from flowpool.registry import Agent, Application

from .admin import LimitsUpdate
from .datastores import SearchRequest
from .models import ActivateRequest, InvokeRequest, RunCreateRequest, UploadRequest, ValidateRequest
from .parsing import MAX_OFFSET, MAX_PAGE
from .preview import PreviewRequest
from .services import services

bp = Blueprint("openapi", __name__)

# Request bodies by endpoint; everything else takes no body.
_BODIES: dict[str, type[BaseModel]] = {
    "invoke.chat_completions": InvokeRequest,
    "preview.preview": PreviewRequest,
    "runs.create_run": RunCreateRequest,
    "workflows.upload": UploadRequest,
    "workflows.create_workflow": UploadRequest,
    "workflows.validate": ValidateRequest,
    "workflows.activate": ActivateRequest,
    "applications.put_application": Application,
    "agents.put_agent": Agent,
    "datastores.search": SearchRequest,
    "admin.put_limits": LimitsUpdate,
}
_PUBLIC = {"health.healthz", "health.readyz", "openapi.openapi", "metrics.metrics"}
# Operator routes (api/operators.py): the admin token, or loopback when FLOWPOOL_ADMIN_TOKEN is unset.
_OPERATOR = {"pool.get_pool", "admin.get_limits", "admin.put_limits"}
# Endpoints that page their answer with ``offset`` and ``limit`` (api/parsing.py page_args).
_PAGED = {"workflows.list_workflows", "workflows.list_versions", "runs.list_runs", "runs.get_session",
          "applications.list_applications", "agents.list_agents", "datastores.list_datastores"}
_PAGE_PARAMETERS = [
    {"name": "offset", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0}},
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 25}},
]
# Query parameters of other endpoints.
_QUERY: dict[str, list[dict[str, Any]]] = {
    "runs.get_run": [
        {"name": "wait", "in": "query", "required": False, "description": "long-poll up to this many seconds "
         "(at most FLOWPOOL_RUN_WAIT_MAX_SECONDS) for the run to end", "schema": {"type": "number", "minimum": 0}},
    ],
    "runs.list_all_runs": [
        {"name": "workflow", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "status", "in": "query", "required": False, "description": "run statuses, comma-separated",
         "schema": {"type": "string"}},
        {"name": "session_id", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "since", "in": "query", "required": False, "description": "queued at or after: unix seconds or "
         "ISO 8601 with its offset", "schema": {"type": "string"}},
        {"name": "until", "in": "query", "required": False, "description": "queued before (exclusive): unix "
         "seconds or ISO 8601 with its offset; the answer's next_until pages on", "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50}},
    ],
    "workflows.workflow_stats": [
        {"name": "hours", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 168, "default": 24}},
    ],
    "usage.get_usage": [
        {"name": "from", "in": "query", "required": False, "schema": {"type": "string", "format": "date"}},
        {"name": "to", "in": "query", "required": False, "schema": {"type": "string", "format": "date"}},
        {"name": "group_by", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["day", "workflow"], "default": "day"}},
    ],
}
# Answers other than a plain 200, by endpoint.
_RESPONSES: dict[str, dict[str, Any]] = {
    "runs.create_run": {
        "202": {"description": "queued: {request_id, status, status_url, stream_url}, at the top level"},
        "200": {"description": "a cache hit or an ended run's replay: those keys and the run's fields"},
    },
}
_ERROR = {"description": "an error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the app being served."""
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "integer"}}}}},
    }
    paths: dict[str, dict[str, Any]] = {}
    for rule in current_app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)  # <path:record_id> -> {record_id}
        view = current_app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operation: dict[str, Any] = {
                "operationId": rule.endpoint.replace(".", "_") + ("" if method == "GET" else f"_{method.lower()}"),
                "summary": (view.__doc__ or rule.endpoint).strip().splitlines()[0],
                "parameters": [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                               for name in sorted(rule.arguments)]
                + (_PAGE_PARAMETERS if rule.endpoint in _PAGED else []) + _QUERY.get(rule.endpoint, []),
                "responses": {**_RESPONSES.get(rule.endpoint, {"200": {"description": "OK"}}), "default": _ERROR},
            }
            model = _BODIES.get(rule.endpoint)
            if model is not None and method in ("POST", "PUT"):
                schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schemas[model.__name__].pop("$defs", {}))
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            if rule.endpoint == "metrics.metrics" and services().settings.metrics_token is not None:
                operation["security"] = [{"metricsToken": []}]  # FLOWPOOL_METRICS_TOKEN is set
            elif rule.endpoint in _OPERATOR:
                operation["security"] = [{"adminToken": []}]
            elif rule.endpoint not in _PUBLIC:
                operation["security"] = [{"apiKey": []}, {"maitaiApiKey": []}, {"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "flowpool", "version": flowpool.__version__,
                 "description": "Run multi-step AI workflows as one API call."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas, "securitySchemes": {
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            "maitaiApiKey": {"type": "apiKey", "in": "header", "name": "X-Maitai-Api-Key",
                             "description": "the same key, in the header the seed's management API documents"},
            "bearer": {"type": "http", "scheme": "bearer"},
            "metricsToken": {"type": "http", "scheme": "bearer", "description": "FLOWPOOL_METRICS_TOKEN"},
            "adminToken": {"type": "http", "scheme": "bearer", "description": "FLOWPOOL_ADMIN_TOKEN (unset: loopback "
                           "only)"}}},
    }


@bp.get("/openapi.json")
def openapi():  # type: ignore[no-untyped-def]
    """The OpenAPI description of this API."""
    return jsonify(build_document())
