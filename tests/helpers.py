"""Helpers shared by the tests: an HTTP client of the test stack and error-envelope checks."""
from __future__ import annotations

import textwrap
from typing import Any

import psutil
import requests


def running(process: psutil.Process) -> bool:
    """Whether a process is alive and not a zombie (a process that is gone just now is not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Client:
    """An HTTP client of the test stack, authenticated as one account."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url
        self.key = key
        self.session = requests.Session()
        self.session.headers["x-api-key"] = key

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.session.request(method, self.base_url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def upload(self, ref: str, script: str, **fields: Any) -> dict[str, Any]:
        """Upload a script (dedented) and return the ``data`` of the answer; fails the test on error."""
        response = self.post("/api/v1/workflows/upload",
                             json={"workflow_ref_name": ref, "script": textwrap.dedent(script), **fields})
        assert response.status_code in (200, 201), response.text
        return response.json()["data"]

    def invoke(self, ref: str, **body: Any) -> requests.Response:
        """POST /workflow/chat/completions with ``model=workflow:<ref>``."""
        body.setdefault("model", f"workflow:{ref}")
        if "input" not in body and "messages" not in body:
            body["input"] = {}
        return self.post("/workflow/chat/completions", json=body)

    def run(self, request_id: str) -> dict[str, Any]:
        response = self.get(f"/api/v1/runs/{request_id}")
        assert response.status_code == 200, response.text
        return response.json()["data"]


def error_of(response: requests.Response) -> dict[str, Any]:
    """The ``error`` object of an error answer, checking its envelope."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == response.status_code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]
