"""Accessories at run time through the whole stack: uploaded over HTTP, loaded by runs on the real worker.

A run's ``ctx.load_accessory`` is a ctx call the worker answers with an open
read-only descriptor of its disk-cached copy; these tests check what the
script sees, that a rollback brings back its version's accessories, the
fallback, isolation between accounts, and that a 50 MB accessory is fetched
from the blob store once per worker (the ``flowpool_accessory_fetches``
counter of ``/metrics``), however many runs load it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import requests

from flowpool import keys
from flowpool.blobs import S3Blobs
from flowpool.devstack import Stack
from flowpool.run import RunJob
from flowpool.settings import Settings
from flowpool.tasks.accessories import AccessoryCache
from tests.helpers import Client, error_of

LOADS = """
    import os

    def execute(ctx):
        key = ctx.input["key"]
        env = key.upper().replace("-", "_").replace(".", "_") + "_S3_KEY"
        return {"value": ctx.load_accessory(key), "env": ctx.env.get(env), "environ": os.environ.get(env)}
"""


def _ref(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _output(response: requests.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["output"]


def _blob_of(upload: dict[str, Any], key: str) -> str:
    return upload["version"]["accessory_objects"][key]["object"]


def _metric(stack: Stack, name: str) -> float:
    text = requests.get(f"{stack.api_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_run_loads_its_accessory_and_sees_its_env_entry(client: Client) -> None:
    ref = _ref("tariffs")
    codes = {"8471.30": "laptops", "0901.21": "coffee, roasted", "rates": [0.0, 2.5, 6.5]}
    data = client.upload(ref, LOADS, accessories=[
        {"key": "hts-codes", "content_base64": _b64(json.dumps(codes).encode())}])
    blob = _blob_of(data, "hts-codes")

    output = _output(client.invoke(ref, input={"key": "hts-codes"}))

    assert output == {"value": codes, "env": blob, "environ": blob}
    assert blob.startswith("accessories/") and blob.endswith(hashlib.sha256(json.dumps(codes).encode()).hexdigest())


def test_a_rollback_brings_back_its_versions_accessory_and_env(client: Client) -> None:
    ref = _ref("rolled")
    v1 = client.upload(ref, LOADS, accessories=[{"key": "cfg", "content_base64": _b64(b'{"a": 1}')}])
    v2 = client.upload(ref, LOADS, accessories=[{"key": "cfg", "content_base64": _b64(b'{"a": 2}')}])
    assert _output(client.invoke(ref, input={"key": "cfg"})) == {"value": {"a": 2}, "env": _blob_of(v2, "cfg"),
                                                                 "environ": _blob_of(v2, "cfg")}

    response = client.post(f"/api/v1/workflows/{ref}/activate", json={"version": v1["version"]["version"]})
    assert response.status_code == 200, response.text

    assert _output(client.invoke(ref, input={"key": "cfg"})) == {"value": {"a": 1}, "env": _blob_of(v1, "cfg"),
                                                                 "environ": _blob_of(v1, "cfg")}
    assert _blob_of(v1, "cfg") != _blob_of(v2, "cfg")


def test_a_fallback_path_is_loaded_for_a_key_the_version_has_not(client: Client) -> None:
    ref = _ref("fallback")
    client.upload(ref, """
        import json, os, tempfile

        def execute(ctx):
            path = os.path.join(tempfile.gettempdir(), "local.json")
            with open(path, "w") as f:
                json.dump({"from": "local file"}, f)
            return {"missing": ctx.load_accessory("dev-only", fallback_path=path),
                    "stored": ctx.load_accessory("stored", fallback_path=path)}
    """, accessories=[{"key": "stored", "content_base64": _b64(b'{"from": "the version"}')}])

    assert _output(client.invoke(ref)) == {"missing": {"from": "local file"}, "stored": {"from": "the version"}}


def test_an_unknown_key_fails_the_run_naming_the_stored_keys(client: Client) -> None:
    ref = _ref("unknown")
    client.upload(ref, LOADS, accessories=[{"key": "b-list", "content_base64": _b64(b"[]")},
                                           {"key": "a-map", "content_base64": _b64(b"{}")}])

    response = client.invoke(ref, input={"key": "nope"})

    assert response.status_code != 200
    message = error_of(response)["message"]
    assert "NotFoundError" in message, message
    assert f"workflow {ref}@1.0.0 has no accessory 'nope'; its accessories: a-map, b-list" in message


def test_another_accounts_accessory_cannot_be_read(client: Client, stack: Stack) -> None:
    assert stack.api_url is not None
    other = Client(stack.api_url, stack.create_account(f"test-{uuid.uuid4().hex[:8]}"))
    ref = _ref("private")
    theirs = other.upload(ref, LOADS, accessories=[{"key": "secret", "content_base64": _b64(b'"theirs"')}])
    ours = client.upload(ref, """
        def execute(ctx):
            try:
                return ctx.load_accessory("secret")
            except Exception as exc:
                return type(exc).__name__ + ": " + str(exc)
    """, accessories=[{"key": "mine", "content_base64": _b64(b'"theirs"')}])  # the same bytes

    assert _output(client.invoke(ref)) == \
        f"NotFoundError: workflow {ref}@1.0.0 has no accessory 'secret'; its accessories: mine"
    assert _output(other.invoke(ref, input={"key": "secret"}))["value"] == "theirs"
    assert _blob_of(ours, "mine") != _blob_of(theirs, "secret")  # the same bytes, a blob per account


def test_a_workflow_called_inline_loads_its_own_versions_accessories(client: Client) -> None:
    inner, outer = _ref("inner"), _ref("outer")
    client.upload(inner, """
        def execute(ctx):
            return ctx.load_accessory("k")
    """, accessories=[{"key": "k", "content_base64": _b64(b'"inner"')}])
    client.upload(outer, f"""
        def execute(ctx):
            return [ctx.load_accessory("k"), ctx.workflows.call("{inner}"), ctx.load_accessory("k")]
    """, accessories=[{"key": "k", "content_base64": _b64(b'"outer"')}])

    assert _output(client.invoke(outer)) == ["outer", "inner", "outer"]


def test_a_run_is_refused_accessories_past_its_memory_limit(client: Client) -> None:
    """Each copy a run holds stays in memory until it lets go, outside the worker's budget: a script asking
    the transport again and again (ctx.load_accessory itself asks once per key) is stopped at its memory limit."""
    ref = _ref("hoard")
    client.upload(ref, """
        LIMITS = {"memory_mb": 256}

        def execute(ctx):
            held = []
            try:
                while len(held) < 40:
                    held.append(ctx._transport.call_with_file("accessory", {"key": "big"})[1])
            except Exception as exc:
                return {"handed": len(held), "error": str(exc)}
            return {"handed": len(held)}
    """, accessories=[{"key": "big", "content_base64": _b64(b'"' + b"x" * ((16 << 20) - 2) + b'"')}])

    output = _output(client.invoke(ref))

    assert output["handed"] == 16  # 16 MB each within 256 MB
    assert "'big'" in output["error"] and "over its memory limit of 256 MB" in output["error"]


def test_a_50_mb_accessory_is_fetched_once_per_worker_over_many_runs(client: Client, stack: Stack) -> None:
    ref = _ref("large")
    text = os.urandom(25 << 20).hex()[:(50 << 20) - 2]  # fresh bytes: no host cache holds them yet
    content = json.dumps(text).encode()
    assert len(content) == 50 << 20
    response = client.post("/api/v1/workflows/upload", timeout=120, data={
        "workflow_ref_name": ref, "timeout_seconds": "60", "script": """
import hashlib

def execute(ctx):
    value = ctx.load_accessory("big")
    return {"length": len(value), "sha256": hashlib.sha256(value.encode()).hexdigest()}
"""}, files={"accessory_big": ("big.json", content, "application/json")})
    assert response.status_code == 201, response.text
    fetches = _metric(stack, "flowpool_accessory_fetches_total")
    fetched = _metric(stack, "flowpool_accessory_fetch_bytes_total")
    expected = {"length": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}

    with ThreadPoolExecutor(4) as pool:  # four runs asking at once, while none is cached yet
        first = list(pool.map(lambda _: _output(client.invoke(ref, input={"n": uuid.uuid4().hex})), range(4)))
    later = [_output(client.invoke(ref, input={"n": n})) for n in range(2)]

    assert first + later == [expected] * 6
    assert _metric(stack, "flowpool_accessory_fetches_total") == fetches + 1
    assert _metric(stack, "flowpool_accessory_fetch_bytes_total") == fetched + len(content)


def test_the_cache_fetches_from_the_s3_backend(s3_server: dict[str, Any], redis_server: Any, tmp_path: Path,
                                              monkeypatch: Any) -> None:
    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    blobs = S3Blobs(f"s3://{s3_server['bucket']}/accessories-test", s3_server["endpoint_url"])
    data = json.dumps({"from": "s3", "n": list(range(100))}).encode()
    sha = hashlib.sha256(data).hexdigest()
    blobs.put(f"accessories/acct-s3/{sha}", data)
    client = redis.Redis(port=redis_server.port, db=14)
    account, ref = "acct-s3", _ref("s3")
    client.hset(keys.version(account, ref, "1.0.0"), "meta", json.dumps({
        "version": "1.0.0", "content_hash": "h", "accessories": ["cfg"],
        "accessory_objects": {"cfg": {"object": f"accessories/acct-s3/{sha}", "sha256": sha, "size": len(data)}}}))
    cache = AccessoryCache(client, Settings(cache_dir=str(tmp_path)), blobs)
    job = RunJob(request_id="r", account=account, workflow=ref, version="1.0.0", content_hash="h", soft_seconds=10)
    try:
        answer = cache.open(job, "cfg", time.monotonic() + 30)
        with os.fdopen(answer.fd, "rb") as file:
            assert file.read() == data
        assert (tmp_path / "accessories" / sha).read_bytes() == data
    finally:
        client.delete(keys.version(account, ref, "1.0.0"))
        client.close()
