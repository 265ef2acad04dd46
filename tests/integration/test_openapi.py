"""GET /openapi.json describes every route the API serves."""
from __future__ import annotations

import requests

from flowpool.devstack import Stack


def test_openapi_lists_every_route_with_its_request_body(stack: Stack) -> None:
    assert stack.api_url is not None
    response = requests.get(stack.api_url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path, method in [("/workflow/chat/completions", "post"), ("/api/v1/workflows/upload", "post"),
                         ("/api/v1/workflows/{ref}", "get"), ("/api/v1/workflows/{ref}", "delete"),
                         ("/api/v1/runs/{request_id}", "get"), ("/api/v1/runs/{request_id}/stream", "get"),
                         ("/api/v1/applications/{name}", "put"), ("/api/v1/sessions/{session_id}", "get"),
                         ("/healthz", "get"), ("/readyz", "get")]:
        assert method in paths.get(path, {}), (path, method)
    invoke = paths["/workflow/chat/completions"]["post"]
    ref = invoke["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "messages", "input", "stream", "secrets", "cache"} <= set(schema["properties"])
    assert invoke["security"] and "security" not in paths["/healthz"]["get"]
    for ref_path in _refs(doc):
        assert ref_path.rsplit("/", 1)[1] in doc["components"]["schemas"], ref_path


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []
