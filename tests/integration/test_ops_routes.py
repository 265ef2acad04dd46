"""GET /openapi.json describes every route the API serves; GET /metrics counts what they do."""
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


def _metric(text: str, name: str) -> float:
    """The value of sample ``name`` (labels included) in Prometheus text, 0 if absent."""
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_runs_hits_and_workers_across_processes(stack: Stack) -> None:
    import uuid

    from tests.helpers import Client

    assert stack.api_url is not None
    client = Client(stack.api_url, stack.create_account(f"metrics-{uuid.uuid4().hex[:6]}"))
    before = requests.get(stack.api_url + "/metrics", timeout=10).text
    client.upload("counted", "def execute(ctx):\n    return 1\n")
    assert client.invoke("counted", input={"x": 1}).status_code == 200
    assert client.invoke("counted", input={"x": 1}).headers["X-Cache"] == "HIT"
    response = requests.get(stack.api_url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    after = response.text
    ok = 'flowpool_runs_finished_total{status="succeeded"}'
    assert _metric(after, ok) == _metric(before, ok) + 1
    assert _metric(after, "flowpool_cache_hits_total") == _metric(before, "flowpool_cache_hits_total") + 1
    assert _metric(after, "flowpool_workers") >= 1
    assert "flowpool_queue_length" in after
