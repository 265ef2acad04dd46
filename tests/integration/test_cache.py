"""The result cache and single flight, over HTTP against the session's stack.

A cache entry is keyed by the account, the script version, the workflow's
env, ``input``, ``messages``, ``metadata``, ``max_tokens``, ``temperature``
and a keyed hash of the secrets; it lives in Redis under
``fp:a:<account>:cache:<hash>`` for the workflow's cache TTL. The scripts
here return a fresh random nonce, so equal outputs prove a result was reused
and different ones prove the script ran again.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import requests

from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer
from flowpool.registry import Accounts
from tests.conftest import TEST_ENV
from tests.helpers import Client, error_of, eventually, every_value_in
from tests.provider import StandInProvider

INVOKE = "/workflow/chat/completions"

# Everything the cache key is made of comes back, with a nonce that differs on every run.
NONCE = """
    import uuid

    def execute(ctx):
        return {"nonce": uuid.uuid4().hex, "input": ctx.input, "messages": ctx.messages,
                "metadata": ctx.metadata, "max_tokens": ctx.params["max_tokens"],
                "temperature": ctx.params["temperature"], "env": ctx.env}
"""

NONCE_WITH_SECRET = """
    import uuid

    def execute(ctx):
        return {"nonce": uuid.uuid4().hex, "token_length": len(ctx.secrets.get("token", ""))}
"""

NO_CACHE_CONSTANT = """
    import uuid

    CACHE_TTL_SECONDS = 0

    def execute(ctx):
        return {"nonce": uuid.uuid4().hex}
"""

LONG_CACHE_CONSTANT = """
    import uuid

    CACHE_TTL_SECONDS = 3600

    def execute(ctx):
        return {"nonce": uuid.uuid4().hex}
"""

TTL_CONSTANT = """
    import uuid

    CACHE_TTL_SECONDS = 120

    def execute(ctx):
        return {"nonce": uuid.uuid4().hex}
"""

NO_TTL_CONSTANT = """
    import uuid

    def execute(ctx):
        return {"nonce": uuid.uuid4().hex}
"""

VERSIONED = """
    import uuid

    def execute(ctx):
        return {"version": "%s", "nonce": uuid.uuid4().hex}
"""

RAISES = """
    def execute(ctx):
        raise RuntimeError("this run fails")
        return {}
"""

# Long enough that concurrent identical requests all arrive while it runs.
SLOW = """
    import time
    import uuid

    def execute(ctx):
        time.sleep(1.5)
        return {"nonce": uuid.uuid4().hex}
"""

SLOW_RAISES = """
    import time

    def execute(ctx):
        time.sleep(1.5)
        raise RuntimeError("slow failure")
        return {}
"""

# Uses the secret every way a script can, except returning it.
USES_SECRET = """
    def execute(ctx):
        token = ctx.secrets["token"]
        ctx.log.info("calling upstream with " + token, token=token)
        ctx.emit("debug", {"token": token, "text": "token=" + token})
        print("token", token)
        return {"length": len(token)}
"""

RETURNS_SECRET = """
    def execute(ctx):
        token = ctx.secrets["token"]
        ctx.log.info("token is " + token)
        return {"echoed": token}
"""

SLOW_RETURNS_SECRET = """
    import time

    def execute(ctx):
        time.sleep(1.5)
        return {"echoed": ctx.secrets["token"]}
"""

# The base request of the cache-key tests; each variant changes one part of it.
BASE_REQUEST: dict[str, Any] = {
    "input": {"query": "what is cached?", "n": 1},
    "messages": [{"role": "user", "content": "hello"}],
    "metadata": {"tenant": "a"},
    "max_tokens": 64,
    "temperature": 0.5,
}


def _ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def _ref(name: str) -> str:
    """A workflow ref unique to this test run, so reruns on a shared Redis never collide."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _runs(client: Client, ref: str) -> tuple[list[dict[str, Any]], int]:
    """The workflow's runs, newest first, and their total."""
    response = client.get(f"/api/v1/workflows/{ref}/runs", params={"limit": 100})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["data"], body["pagination"]["total"]


def _account_id(stack: Stack, client: Client) -> str:
    store = redis.Redis.from_url(stack.redis_url)
    try:
        return Accounts(store).authenticate(client.key).id
    finally:
        store.close()


def _keys(stack: Stack, pattern: str) -> list[bytes]:
    store = redis.Redis.from_url(stack.redis_url)
    try:
        return list(store.scan_iter(match=pattern, count=1000))
    finally:
        store.close()


def _cache_keys(stack: Stack, client: Client) -> list[bytes]:
    """The account's cache entries in Redis."""
    return _keys(stack, f"fp:a:{_account_id(stack, client)}:cache:*")


@pytest.fixture
def nonce(client: Client) -> str:
    ref = _ref("nonce")
    client.upload(ref, NONCE)
    return ref


# Hits and misses.

def test_identical_request_is_a_hit_with_the_same_output_and_a_new_request_id(client: Client, nonce: str) -> None:
    first = client.invoke(nonce, **BASE_REQUEST)
    second = client.invoke(nonce, **BASE_REQUEST)
    assert first.headers["X-Cache"] == "MISS"
    assert second.headers["X-Cache"] == "HIT"
    miss, hit = _ok(first), _ok(second)
    assert hit["output"] == miss["output"]
    assert hit["choices"][0]["message"]["content"] == miss["choices"][0]["message"]["content"]
    assert hit["request_id"] != miss["request_id"]
    assert second.headers["X-Request-Id"] == hit["request_id"]
    assert first.headers["X-Request-Id"] == miss["request_id"]


def test_hit_has_its_own_run_record_marked_cache_hit(client: Client, nonce: str) -> None:
    miss = _ok(client.invoke(nonce, **BASE_REQUEST))
    hit = _ok(client.invoke(nonce, **BASE_REQUEST))
    record = client.run(hit["request_id"])
    assert record["cache_hit"] is True
    assert record["status"] == "succeeded"
    assert record["origin_request_id"] == miss["request_id"]
    assert record["output"] == miss["output"]
    assert client.run(miss["request_id"])["cache_hit"] is False
    runs, total = _runs(client, nonce)
    assert total == 2
    assert [(r["request_id"], r["cache_hit"]) for r in runs] == [(hit["request_id"], True),
                                                                  (miss["request_id"], False)]


def test_hit_answers_with_the_callers_own_session_id(client: Client, nonce: str) -> None:
    _ok(client.invoke(nonce, session_id="sess-first", **BASE_REQUEST))
    response = client.invoke(nonce, session_id="sess-second", **BASE_REQUEST)
    assert response.headers["X-Cache"] == "HIT"
    assert _ok(response)["session_id"] == "sess-second"


def test_input_key_order_does_not_change_the_key(client: Client, nonce: str) -> None:
    first = client.invoke(nonce, input={"a": 1, "b": {"x": 1, "y": 2}})
    second = client.invoke(nonce, input={"b": {"y": 2, "x": 1}, "a": 1})
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert _ok(second)["output"] == _ok(first)["output"]


def test_cache_false_bypasses_the_cache_and_runs_again(client: Client, nonce: str) -> None:
    cached = _ok(client.invoke(nonce, **BASE_REQUEST))
    response = client.invoke(nonce, cache=False, **BASE_REQUEST)
    assert response.headers["X-Cache"] == "MISS"
    fresh = _ok(response)
    assert fresh["output"]["nonce"] != cached["output"]["nonce"]
    assert client.run(fresh["request_id"])["cache_hit"] is False
    assert _runs(client, nonce)[1] == 2
    # The bypass did not replace the stored entry.
    again = client.invoke(nonce, **BASE_REQUEST)
    assert again.headers["X-Cache"] == "HIT"
    assert _ok(again)["output"] == cached["output"]


def test_cache_false_does_not_store_its_result(client: Client, nonce: str, stack: Stack) -> None:
    bypassed = _ok(client.invoke(nonce, cache=False, **BASE_REQUEST))
    assert _cache_keys(stack, client) == []
    response = client.invoke(nonce, **BASE_REQUEST)
    assert response.headers["X-Cache"] == "MISS"
    assert _ok(response)["output"]["nonce"] != bypassed["output"]["nonce"]


@pytest.mark.parametrize("change", [
    {"input": {"query": "what is cached?", "n": 2}},
    {"input": {"query": "what is cached?"}},
    {"messages": [{"role": "user", "content": "hello!"}]},
    {"messages": [{"role": "user", "content": "hello"}, {"role": "user", "content": "again"}]},
    {"metadata": {"tenant": "b"}},
    {"metadata": None},
    {"max_tokens": 65},
    {"temperature": 0.6},
], ids=["input-value", "input-field-gone", "message-content", "extra-message", "metadata", "no-metadata",
        "max_tokens", "temperature"])
def test_request_differing_in_one_part_is_a_miss(client: Client, nonce: str, change: dict[str, Any]) -> None:
    first = _ok(client.invoke(nonce, **BASE_REQUEST))
    changed = {k: v for k, v in {**BASE_REQUEST, **change}.items() if v is not None}
    response = client.invoke(nonce, **changed)
    assert response.headers["X-Cache"] == "MISS"
    assert _ok(response)["output"]["nonce"] != first["output"]["nonce"]
    assert _runs(client, nonce)[1] == 2


def test_different_secret_value_is_a_miss_and_the_same_one_a_hit(client: Client) -> None:
    ref = _ref("secret-key")
    client.upload(ref, NONCE_WITH_SECRET)
    first = client.invoke(ref, input={}, secrets={"token": "secret-one"})
    other = client.invoke(ref, input={}, secrets={"token": "secret-two"})
    same = client.invoke(ref, input={}, secrets={"token": "secret-one"})
    none = client.invoke(ref, input={})
    assert [r.headers["X-Cache"] for r in (first, other, same, none)] == ["MISS", "MISS", "HIT", "MISS"]
    assert _ok(other)["output"]["nonce"] != _ok(first)["output"]["nonce"]
    assert _ok(same)["output"] == _ok(first)["output"]
    assert _ok(none)["output"]["token_length"] == 0


def test_each_account_has_its_own_cache(client: Client, stack: Stack) -> None:
    other = Client(client.base_url, stack.create_account(f"other-{uuid.uuid4().hex[:8]}"))
    ref = _ref("shared-name")
    client.upload(ref, NONCE)
    other.upload(ref, NONCE)
    mine = _ok(client.invoke(ref, **BASE_REQUEST))
    response = other.invoke(ref, **BASE_REQUEST)
    assert response.headers["X-Cache"] == "MISS"
    assert _ok(response)["output"]["nonce"] != mine["output"]["nonce"]


# What turns caching off or changes the key: TTL 0, failures, new versions, env.

@pytest.mark.parametrize("script, fields", [
    (NO_CACHE_CONSTANT, {}),
    (NO_TTL_CONSTANT, {"cache_ttl_seconds": 0}),
    (LONG_CACHE_CONSTANT, {"cache_ttl_seconds": 0}),
], ids=["script-constant-0", "upload-field-0", "upload-field-0-over-constant"])
def test_cache_ttl_zero_never_caches(client: Client, stack: Stack, script: str, fields: dict[str, Any]) -> None:
    ref = _ref("uncached")
    client.upload(ref, script, **fields)
    first = client.invoke(ref, **BASE_REQUEST)
    second = client.invoke(ref, **BASE_REQUEST)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "MISS")
    assert _ok(first)["output"]["nonce"] != _ok(second)["output"]["nonce"]
    assert _runs(client, ref)[1] == 2
    assert _cache_keys(stack, client) == []


@pytest.mark.parametrize("script, fields, ttl", [
    (NO_TTL_CONSTANT, {}, 3600),
    (TTL_CONSTANT, {}, 120),
    (TTL_CONSTANT, {"cache_ttl_seconds": 300}, 300),
    (LONG_CACHE_CONSTANT, {"cache_ttl_seconds": 30}, 30),
], ids=["default", "script-constant", "upload-field-over-constant", "shorter-upload-field"])
def test_cache_entry_expires_after_the_workflows_ttl(client: Client, stack: Stack, script: str,
                                                      fields: dict[str, Any], ttl: int) -> None:
    ref = _ref("ttl")
    client.upload(ref, script, **fields)
    _ok(client.invoke(ref, **BASE_REQUEST))
    [key] = _cache_keys(stack, client)
    store = redis.Redis.from_url(stack.redis_url)
    try:
        remaining = store.ttl(key)
    finally:
        store.close()
    # Seconds pass between the write and the look: only the upper bound is exact.
    assert ttl - 60 < remaining <= ttl


def test_entry_with_a_short_ttl_is_a_hit_then_a_miss_once_it_expired(client: Client, stack: Stack,
                                                                      redis_server: RedisServer) -> None:
    # 2 s rather than 1: the hit must come before the entry expires, even on a busy machine.
    ref = _ref("short-ttl")
    client.upload(ref, NO_TTL_CONSTANT, cache_ttl_seconds=2)
    first = _ok(client.invoke(ref, **BASE_REQUEST))
    hit = client.invoke(ref, **BASE_REQUEST)
    assert hit.headers["X-Cache"] == "HIT"
    assert _ok(hit)["output"] == first["output"]
    store = redis.Redis(port=redis_server.port)
    try:
        [key] = _cache_keys(stack, client)
        assert key.startswith(f"fp:a:{_account_id(stack, client)}:cache:".encode())
        assert 0 < store.pttl(key) <= 2000
        deadline = time.monotonic() + 10
        while store.exists(key) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.exists(key) == 0, "the entry outlived its TTL"
    finally:
        store.close()
    miss = client.invoke(ref, **BASE_REQUEST)
    assert miss.headers["X-Cache"] == "MISS"
    assert _ok(miss)["output"]["nonce"] != first["output"]["nonce"]


def test_failed_run_is_not_cached(client: Client, stack: Stack) -> None:
    ref = _ref("fails")
    client.upload(ref, RAISES)
    first = client.invoke(ref, **BASE_REQUEST)
    second = client.invoke(ref, **BASE_REQUEST)
    assert first.status_code == second.status_code == 500
    assert error_of(first)["request_id"] != error_of(second)["request_id"]
    assert "X-Cache" not in second.headers or second.headers["X-Cache"] == "MISS"
    runs, total = _runs(client, ref)
    assert total == 2
    assert [(r["status"], r["cache_hit"]) for r in runs] == [("failed", False), ("failed", False)]
    assert _cache_keys(stack, client) == []


def test_new_version_of_the_script_is_a_miss(client: Client) -> None:
    ref = _ref("versions")
    first_version = client.upload(ref, VERSIONED % "one")["version"]["version"]
    one = _ok(client.invoke(ref, **BASE_REQUEST))
    client.upload(ref, VERSIONED % "two")
    response = client.invoke(ref, **BASE_REQUEST)
    assert response.headers["X-Cache"] == "MISS"
    assert _ok(response)["output"]["version"] == "two"
    # Rolling back brings back the old version's entry: the key follows the script's content.
    activated = client.post(f"/api/v1/workflows/{ref}/activate", json={"version": first_version})
    assert activated.status_code == 200, activated.text
    back = client.invoke(ref, **BASE_REQUEST)
    assert back.headers["X-Cache"] == "HIT"
    assert _ok(back)["output"] == one["output"]


def test_changed_workflow_env_is_a_miss(client: Client, nonce: str) -> None:
    client.upload(nonce, NONCE, env={"REGION": "eu"})
    first = _ok(client.invoke(nonce, **BASE_REQUEST))
    client.upload(nonce, NONCE, env={"REGION": "us"})
    response = client.invoke(nonce, **BASE_REQUEST)
    assert response.headers["X-Cache"] == "MISS"
    assert _ok(response)["output"]["env"] == {"REGION": "us"}
    assert _ok(response)["output"]["nonce"] != first["output"]["nonce"]


# Single flight: identical requests while the first one runs share its run.

def _concurrently(client: Client, ref: str, count: int, **body: Any) -> list[requests.Response]:
    """``count`` identical invokes sent at the same moment, each on its own connection."""
    barrier = threading.Barrier(count)
    payload = {"model": f"workflow:{ref}", **body}

    def invoke(_: int) -> requests.Response:
        barrier.wait(10)
        return requests.post(client.base_url + INVOKE, json=payload, headers={"x-api-key": client.key},
                             timeout=60)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(invoke, range(count)))


@pytest.mark.parametrize("count", [2, 5])
def test_concurrent_identical_requests_share_one_run(client: Client, stack: Stack, count: int) -> None:
    ref = _ref("single-flight")
    client.upload(ref, SLOW)
    responses = _concurrently(client, ref, count, **BASE_REQUEST)
    bodies = [_ok(r) for r in responses]
    assert len({json.dumps(b["output"]) for b in bodies}) == 1
    caches = sorted(r.headers["X-Cache"] for r in responses)
    assert caches == ["HIT"] * (count - 1) + ["MISS"]
    [leader] = [b["request_id"] for r, b in zip(responses, bodies) if r.headers["X-Cache"] == "MISS"]
    runs, total = _runs(client, ref)
    assert total == 1
    assert runs[0]["request_id"] == leader
    assert runs[0]["status"] == "succeeded"
    assert {b["request_id"] for b in bodies} == {leader}
    assert _keys(stack, f"fp:a:{_account_id(stack, client)}:inflight:*") == []


def test_concurrent_identical_requests_share_a_failure_which_is_not_cached(client: Client, stack: Stack) -> None:
    ref = _ref("single-flight-fails")
    client.upload(ref, SLOW_RAISES)
    responses = _concurrently(client, ref, 3, **BASE_REQUEST)
    assert [r.status_code for r in responses] == [500, 500, 500]
    errors = [error_of(r) for r in responses]
    assert len({e["request_id"] for e in errors}) == 1
    assert all("slow failure" in e["message"] for e in errors)
    assert _runs(client, ref)[1] == 1
    assert _keys(stack, f"fp:a:{_account_id(stack, client)}:inflight:*") == []
    assert client.invoke(ref, **BASE_REQUEST).status_code == 500
    assert _runs(client, ref)[1] == 2


# Secrets never reach Redis, whatever the script does with them.

def test_secret_used_by_a_cached_run_is_nowhere_in_redis(client: Client, redis_server: RedisServer) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    ref = _ref("uses-secret")
    client.upload(ref, USES_SECRET)
    first = client.invoke(ref, input={"q": 1}, secrets={"token": secret})
    assert _ok(first)["output"] == {"length": len(secret)}
    hit = client.invoke(ref, input={"q": 1}, secrets={"token": secret})
    assert hit.headers["X-Cache"] == "HIT"
    record = client.run(_ok(first)["request_id"])
    assert record["status"] == "succeeded" and record["logs"] and record["chunks"]
    assert secret not in json.dumps(record)
    assert not [value for value in every_value_in(redis_server) if secret.encode() in value]


def test_output_carrying_a_secret_is_cached_sealed_for_the_same_secrets(client: Client, stack: Stack,
                                                                        redis_server: RedisServer) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    ref = _ref("returns-secret")
    client.upload(ref, RETURNS_SECRET)
    first = client.invoke(ref, input={"q": 1}, secrets={"token": secret})
    assert _ok(first)["output"] == {"echoed": secret}
    assert len(_cache_keys(stack, client)) == 1
    second = client.invoke(ref, input={"q": 1}, secrets={"token": secret})
    assert second.headers["X-Cache"] == "HIT"
    assert _ok(second)["output"] == {"echoed": secret}
    assert secret in _ok(second)["choices"][0]["message"]["content"]
    other = f"sk-live-{uuid.uuid4().hex}"
    third = client.invoke(ref, input={"q": 1}, secrets={"token": other})
    assert third.headers["X-Cache"] == "MISS" and _ok(third)["output"] == {"echoed": other}
    for response in (first, second):
        record = client.run(_ok(response)["request_id"])
        assert record["output"] == {"echoed": "[redacted]"}
        assert secret not in json.dumps(record)
    assert not [value for value in every_value_in(redis_server) if secret.encode() in value]


def test_output_carrying_a_secret_is_nowhere_in_redis_after_the_run(client: Client,
                                                                    redis_server: RedisServer) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    ref = _ref("returns-secret")
    client.upload(ref, RETURNS_SECRET)
    assert _ok(client.invoke(ref, input={"q": 1}, secrets={"token": secret}))["output"] == {"echoed": secret}
    assert not [value for value in every_value_in(redis_server) if secret.encode() in value]


def test_concurrent_identical_requests_all_get_an_output_carrying_their_secret(client: Client,
                                                                            redis_server: RedisServer) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    ref = _ref("single-flight-secret")
    client.upload(ref, SLOW_RETURNS_SECRET)
    responses = _concurrently(client, ref, 4, input={"q": 1}, secrets={"token": secret})
    assert [_ok(r)["output"] for r in responses] == [{"echoed": secret}] * 4
    assert sorted(r.headers["X-Cache"] for r in responses) == ["HIT", "HIT", "HIT", "MISS"]
    assert _runs(client, ref)[1] == 1
    assert not [value for value in every_value_in(redis_server) if secret.encode() in value]


# A cache in a Redis of its own (FLOWPOOL_CACHE_REDIS_URL), one that may evict.

@pytest.mark.slow
def test_a_cache_in_a_redis_of_its_own_hits_single_flights_survives_eviction_and_absence(
        provider: StandInProvider) -> None:
    with RedisServer() as registry, RedisServer(options=["--maxmemory", "64mb",
                                                         "--maxmemory-policy", "allkeys-lru"]) as cache:
        stack = Stack(env={**TEST_ENV, "FLOWPOOL_CACHE_REDIS_URL": cache.url}, redis_url=registry.url)
        try:
            stack.start_worker(quiet=True)
            stack.start_api(quiet=True)
            stack.wait_ready()
            assert stack.api_url is not None
            client = Client(stack.api_url, stack.create_account("own-cache"))
            client.upload("nonce", NONCE)
            first, second = _ok(client.invoke("nonce", **BASE_REQUEST)), client.invoke("nonce", **BASE_REQUEST)
            assert second.headers["X-Cache"] == "HIT"
            assert second.json()["output"] == first["output"] and second.json()["request_id"] != first["request_id"]
            assert client.run(second.json()["request_id"])["cache_hit"] is True
            account = _account_id(stack, client)
            assert _keys(stack, f"fp:a:{account}:cache:*") == []  # nothing of the cache in the registry
            store = redis.Redis.from_url(cache.url)
            assert len(list(store.scan_iter(match=f"fp:a:{account}:cache:*"))) == 1

            # Identical requests in flight share one run: the single-flight lock lives in the cache's Redis.
            gate = uuid.uuid4().hex
            client.upload("held", f"""
                def execute(ctx):
                    ctx.http.get("{provider.origin}/hold/{gate}")
                    return ctx.request_id
            """)
            with ThreadPoolExecutor(3) as pool:
                answers = [pool.submit(client.invoke, "held", input={"q": 1}) for _ in range(3)]
                eventually(lambda: provider.held(gate) == 1, what="the run waits at the gate")
                provider.open_gate(gate)
                outputs = {_ok(a.result())["output"] for a in answers}
            assert len(outputs) == 1 and _runs(client, "held")[1] == 1

            # An evicted entry is a miss: the workflow runs again.
            store.flushall()
            third = client.invoke("nonce", **BASE_REQUEST)
            assert third.headers["X-Cache"] == "MISS" and third.json()["output"] != first["output"]

            # A cache that is away costs hits, not answers.
            cache.stop()
            for _ in range(2):
                assert client.invoke("nonce", **BASE_REQUEST).headers["X-Cache"] == "MISS"
            store.close()
        finally:
            stack.stop()
