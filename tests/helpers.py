"""Helpers shared by the tests: an HTTP client of the test stack and error-envelope checks."""
from __future__ import annotations

import base64
import json
import marshal
import textwrap
import time
from typing import Any, Callable, Iterator

import psutil
import pytest
import redis
import requests


def running(process: psutil.Process) -> bool:
    """Whether a process is alive and not a zombie (a process that is gone just now is not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def fail_on_leftovers(leaked: list[psutil.Process], name: Callable[[psutil.Process], Any]) -> None:
    """Give processes a test left 5 s to end; kill those still there and fail the test, naming each."""
    if not leaked:
        return
    _, still = psutil.wait_procs(leaked, timeout=5)
    if still:
        names = [name(p) for p in still]
        for proc in still:
            proc.kill()
        pytest.fail(f"test left processes behind: {names}")


def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """The first true value of ``check()``, polled; fails the test, saying ``what``, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what or check}")
        time.sleep(0.05)


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


def _with_message_bodies(values: Iterator[bytes]) -> Iterator[bytes]:
    """Each value, and after a Celery (kombu) message its body decoded: the body travels base64-encoded."""
    for value in values:
        yield value
        if not value.startswith((b"{", b"[")) or b'"body"' not in value:
            continue
        try:
            message = json.loads(value)
        except ValueError:
            continue
        if isinstance(message, list):  # the unacked hash keeps [message, exchange, routing key]
            message = message[0] if message and isinstance(message[0], dict) else {}
        body = message.get("body") if isinstance(message, dict) else None
        if isinstance(body, str) and message.get("properties", {}).get("body_encoding") == "base64":
            yield base64.b64decode(body)


def compiled(source: str) -> bytes:
    """A script as the worker hands it to the sandbox: marshalled code of ``workflow.py``."""
    return marshal.dumps(compile(textwrap.dedent(source), "workflow.py", "exec"))


def every_value_in(server: Any) -> Iterator[bytes]:
    """Every key name and every stored value of every database of ``server``, Celery message bodies decoded."""
    return _with_message_bodies(_every_raw_value_in(server))


def _every_raw_value_in(server: Any) -> Iterator[bytes]:
    first = redis.Redis(port=server.port)
    try:
        databases = int(first.config_get("databases")["databases"])
    finally:
        first.close()
    for db in range(databases):
        store = redis.Redis(port=server.port, db=db)
        try:
            for key in store.scan_iter(count=1000):
                yield key
                kind = store.type(key)
                if kind == b"string":
                    value = store.get(key)
                    if value is not None:
                        yield value
                elif kind == b"hash":
                    for field, value in store.hgetall(key).items():
                        yield field
                        yield value
                elif kind == b"list":
                    yield from store.lrange(key, 0, -1)
                elif kind == b"set":
                    yield from store.smembers(key)
                elif kind == b"zset":
                    yield from store.zrange(key, 0, -1)
                elif kind == b"stream":
                    for _, fields in store.xrange(key):
                        for field, value in fields.items():
                            yield field
                            yield value
                elif kind != b"none":  # the key expired between SCAN and TYPE
                    raise AssertionError(f"unexpected Redis type {kind!r} of {key!r}")
        finally:
            store.close()
