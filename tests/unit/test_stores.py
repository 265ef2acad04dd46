"""Tests of the Redis stores against a real Redis: Workflows, Accounts, ResultCache and RunStore."""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from flowpool import keys
from flowpool.blobs import RedisBlobs
from flowpool.cache import ResultCache
from flowpool.sealing import ServerKey
from flowpool.errors import (
    AuthenticationError, NotFound, OutcomeUnavailable, RequestError, RunNotStarted, ValidationFailed, WorkerLost,
)
from flowpool.redis_server import RedisServer
from flowpool.registry import Accounts, Upload, Workflows
from flowpool.run import RunEnd, RunRecord, RunStatus
from flowpool.runs import RunStore

ACCOUNT = "acct-1"
OTHER_ACCOUNT = "acct-2"

SCRIPT = '''\
TIMEOUT_SECONDS = 30
CACHE_TTL_SECONDS = 3600
INPUT_SCHEMA = {"query": {"type": "string", "required": True}}


def execute(ctx):
    return {"echo": ctx.input}
'''
CHANGED_SCRIPT = SCRIPT.replace('"echo"', '"copy"')


def snapshot(client: redis.Redis) -> dict[bytes, list[bytes]]:
    """Every key of the database with its value's parts (fields, members, entries) in order."""
    found: dict[bytes, list[bytes]] = {}
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"string":
            parts = [client.get(key) or b""]
        elif kind == b"hash":
            parts = [item for pair in sorted(client.hgetall(key).items()) for item in pair]
        elif kind == b"zset":
            parts = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"set":
            parts = sorted(client.smembers(key))
        elif kind == b"list":
            parts = client.lrange(key, 0, -1)
        elif kind == b"stream":
            parts = [item for _, fields in client.xrange(key) for pair in fields.items() for item in pair]
        else:
            raise AssertionError(f"no reader for a {kind!r} at {key!r}")
        found[key] = parts
    return found


def everything(client: redis.Redis) -> bytes:
    """Every key name and value in the database, as one byte string to search."""
    return b"\n".join(key + b"\n" + b"\n".join(parts) for key, parts in snapshot(client).items())


def key_names(client: redis.Redis) -> set[str]:
    return {k.decode() for k in client.scan_iter()}


# Workflows


@pytest.fixture
def workflows(redis_db: redis.Redis) -> Workflows:
    return Workflows(redis_db, blobs=RedisBlobs(redis_db))


def upload(workflows: Workflows, script: str = SCRIPT, ref: str = "summarize", account: str = ACCOUNT,
           **fields: Any) -> tuple[dict[str, Any], dict[str, Any], bool]:
    return workflows.upload(account, Upload(ref=ref, script=script, **fields))


def test_first_upload_creates_version_1_0_0_and_makes_it_active(workflows: Workflows) -> None:
    workflow, version, created = upload(workflows, description="echoes", env={"REGION": "eu"})

    assert created
    assert version["version"] == "1.0.0"
    assert version["content_hash"] == workflows.resolve(ACCOUNT, "summarize").content_hash
    assert version["timeout_seconds"] == 30 and version["cache_ttl_seconds"] == 3600
    assert workflow["workflow_ref_name"] == "summarize"
    assert workflow["active_version"] == "1.0.0"
    assert workflow["description"] == "echoes"
    assert workflow["env_keys"] == ["REGION"]
    assert workflow["input_schema"] == {"query": {"type": "string", "required": True}}
    assert workflows.load_script(ACCOUNT, "summarize", "1.0.0") == SCRIPT


def test_identical_reupload_creates_no_new_version(workflows: Workflows) -> None:
    upload(workflows)
    workflow, version, created = upload(workflows, description="new words only")

    assert not created
    assert version["version"] == "1.0.0"
    assert workflow["description"] == "new words only"  # settings still follow the latest upload
    assert workflows.versions(ACCOUNT, "summarize", 0, 25)[1] == 1


def test_env_only_change_keeps_the_version_but_changes_the_config_hash(workflows: Workflows) -> None:
    upload(workflows, env={"REGION": "eu"})
    before = workflows.resolve(ACCOUNT, "summarize")
    _, version, created = upload(workflows, env={"REGION": "us"})
    after = workflows.resolve(ACCOUNT, "summarize")

    assert not created and version["version"] == "1.0.0"
    assert after.content_hash == before.content_hash
    assert after.config_hash != before.config_hash
    assert after.env == {"REGION": "us"}


@pytest.mark.parametrize(("bump", "expected"), [("patch", "1.0.1"), ("minor", "1.1.0"), ("major", "2.0.0")])
def test_changed_script_creates_the_next_version_by_its_bump(workflows: Workflows, bump: str, expected: str) -> None:
    upload(workflows)
    workflow, version, created = upload(workflows, CHANGED_SCRIPT, version_bump=bump, version_notes="copy now")

    assert created
    assert version["version"] == expected
    assert version["notes"] == "copy now"
    assert workflow["active_version"] == expected
    assert workflows.load_script(ACCOUNT, "summarize", expected) == CHANGED_SCRIPT
    assert workflows.load_script(ACCOUNT, "summarize", "1.0.0") == SCRIPT  # versions are immutable


def test_unknown_version_bump_is_a_request_error_and_writes_nothing(workflows: Workflows,
                                                                    redis_db: redis.Redis) -> None:
    with pytest.raises(RequestError, match="version_bump"):
        upload(workflows, version_bump="huge")
    assert redis_db.dbsize() == 0


def test_accessories_are_part_of_the_content_hash(workflows: Workflows) -> None:
    _, plain, _ = upload(workflows)
    _, with_accessory, created = upload(workflows, accessories={"prompts": b'{"system": "be brief"}'})
    _, changed_accessory, created_again = upload(workflows, accessories={"prompts": b'{"system": "be long"}'})
    _, same_again, created_third = upload(workflows, accessories={"prompts": b'{"system": "be long"}'})

    assert created and created_again and not created_third
    hashes = [plain["content_hash"], with_accessory["content_hash"], changed_accessory["content_hash"]]
    assert len(set(hashes)) == 3
    assert same_again["content_hash"] == changed_accessory["content_hash"]
    assert with_accessory["accessories"] == ["prompts"]
    assert [v["version"] for v in (plain, with_accessory, changed_accessory)] == ["1.0.0", "1.1.0", "1.2.0"]


def test_accessory_that_is_not_json_is_a_request_error(workflows: Workflows, redis_db: redis.Redis) -> None:
    with pytest.raises(RequestError, match="accessory 'prompts'"):
        upload(workflows, accessories={"prompts": b"not json"})
    assert redis_db.dbsize() == 0


def test_activate_rolls_back_and_resolve_then_returns_the_old_version(workflows: Workflows) -> None:
    _, first, _ = upload(workflows)
    upload(workflows, CHANGED_SCRIPT)

    workflow = workflows.activate(ACCOUNT, "summarize", "1.0.0")
    resolved = workflows.resolve(ACCOUNT, "summarize")

    assert workflow["active_version"] == "1.0.0"
    assert resolved.version == "1.0.0"
    assert resolved.content_hash == first["content_hash"]
    versions, total = workflows.versions(ACCOUNT, "summarize", 0, 25)
    assert total == 2
    assert [(v["version"], v["active"]) for v in versions] == [("1.0.0", True), ("1.1.0", False)]


def test_upload_after_a_rollback_numbers_from_the_latest_version(workflows: Workflows) -> None:
    upload(workflows)
    upload(workflows, CHANGED_SCRIPT)
    workflows.activate(ACCOUNT, "summarize", "1.0.0")

    _, reuploaded, created = upload(workflows, CHANGED_SCRIPT)  # content of 1.1.0: activates it again
    assert not created and reuploaded["version"] == "1.1.0"

    _, newest, created = upload(workflows, SCRIPT + "\n# third\n")
    assert created and newest["version"] == "1.2.0"


def test_resolve_with_a_pinned_version_returns_that_version(workflows: Workflows) -> None:
    _, first, _ = upload(workflows)
    upload(workflows, CHANGED_SCRIPT)

    pinned = workflows.resolve(ACCOUNT, "summarize", "1.0.0")
    active = workflows.resolve(ACCOUNT, "summarize")

    assert (pinned.version, pinned.content_hash) == ("1.0.0", first["content_hash"])
    assert active.version == "1.1.0"


def test_upload_settings_win_over_the_script_constants(workflows: Workflows) -> None:
    upload(workflows, timeout_seconds=5, cache_ttl_seconds=0, application_name="support")
    resolved = workflows.resolve(ACCOUNT, "summarize")

    assert resolved.timeout_seconds == 5
    assert resolved.cache_ttl_seconds == 0  # 0 turns caching off; it must not fall back to the script's 3600
    assert resolved.application == "support"


def test_unknown_versions_and_workflows_are_not_found(workflows: Workflows) -> None:
    upload(workflows)

    with pytest.raises(NotFound, match="^Workflow not found: summarize@9.9.9$"):
        workflows.resolve(ACCOUNT, "summarize", "9.9.9")
    with pytest.raises(NotFound):
        workflows.activate(ACCOUNT, "summarize", "9.9.9")
    with pytest.raises(NotFound):
        workflows.load_script(ACCOUNT, "summarize", "9.9.9")
    with pytest.raises(NotFound):
        workflows.resolve(ACCOUNT, "missing")
    with pytest.raises(NotFound):
        workflows.get(ACCOUNT, "missing")
    assert workflows.resolve(ACCOUNT, "summarize").version == "1.0.0"


def test_workflows_of_one_account_are_invisible_to_another(workflows: Workflows) -> None:
    upload(workflows)

    with pytest.raises(NotFound):
        workflows.resolve(OTHER_ACCOUNT, "summarize")
    with pytest.raises(NotFound):
        workflows.get(OTHER_ACCOUNT, "summarize")
    assert workflows.list(OTHER_ACCOUNT, 0, 25) == ([], 0)
    _, version, created = upload(workflows, CHANGED_SCRIPT, account=OTHER_ACCOUNT)
    assert created and version["version"] == "1.0.0"  # numbered on its own


@pytest.mark.parametrize("name", ["summarize:v:1.0.0", "summarize:versions", "summarize:hashes"])
def test_names_addressing_other_keys_of_a_workflow_are_not_found(workflows: Workflows, redis_db: redis.Redis,
                                                                 name: str) -> None:
    upload(workflows)
    stored = snapshot(redis_db)

    for call in (lambda: workflows.get(ACCOUNT, name), lambda: workflows.resolve(ACCOUNT, name),
                 lambda: workflows.versions(ACCOUNT, name, 0, 25), lambda: workflows.delete(ACCOUNT, name),
                 lambda: workflows.activate(ACCOUNT, name, "1.0.0")):
        with pytest.raises(NotFound):
            call()
    assert snapshot(redis_db) == stored
    assert workflows.load_script(ACCOUNT, "summarize", "1.0.0") == SCRIPT


def test_delete_removes_every_key_of_the_workflow(workflows: Workflows, redis_db: redis.Redis) -> None:
    upload(workflows, accessories={"prompts": b"{}"})
    upload(workflows, CHANGED_SCRIPT)
    upload(workflows, ref="keep")
    redis_db.zadd(keys.workflow_runs(ACCOUNT, "summarize"), {"req_1": 1.0})

    workflows.delete(ACCOUNT, "summarize")

    assert not [k for k in key_names(redis_db) if ":wf:summarize" in k]
    assert workflows.list(ACCOUNT, 0, 25)[1] == 1
    assert workflows.resolve(ACCOUNT, "keep").version == "1.0.0"
    with pytest.raises(NotFound):
        workflows.get(ACCOUNT, "summarize")
    with pytest.raises(NotFound):
        workflows.delete(ACCOUNT, "summarize")
    _, version, created = upload(workflows)  # the name is free again, numbered from scratch
    assert created and version["version"] == "1.0.0"


def test_list_and_versions_are_paginated_with_totals(workflows: Workflows) -> None:
    for ref in ("alpha", "beta", "gamma"):
        upload(workflows, ref=ref)
    for n in range(4):
        upload(workflows, SCRIPT + f"\n# revision {n}\n", ref="beta")

    page, total = workflows.list(ACCOUNT, 1, 1)
    assert total == 3
    assert [w["workflow_ref_name"] for w in page] == ["beta"]
    assert [w["workflow_ref_name"] for w in workflows.list(ACCOUNT, 0, 25)[0]] == ["alpha", "beta", "gamma"]
    assert workflows.list(ACCOUNT, 3, 25) == ([], 3)

    versions, total = workflows.versions(ACCOUNT, "beta", 1, 2)
    assert total == 5
    assert [v["version"] for v in versions] == ["1.1.0", "1.2.0"]
    assert workflows.versions(ACCOUNT, "beta", 10, 2) == ([], 5)


@pytest.mark.parametrize("ref", ["", "has space", "-leading-dash", "a/b", "x" * 65, "name\n", "colon:name", "é"])
def test_invalid_ref_name_is_a_request_error_and_writes_nothing(workflows: Workflows, redis_db: redis.Redis,
                                                                ref: str) -> None:
    with pytest.raises(RequestError) as caught:
        upload(workflows, ref=ref)

    assert caught.value.details["param"] == "workflow_ref_name"
    assert redis_db.dbsize() == 0


def test_invalid_script_is_rejected_with_line_numbers_and_nothing_written(workflows: Workflows,
                                                                          redis_db: redis.Redis) -> None:
    script = 'INPUT_SCHEMA = {"q": {"type": "str"}}\n\ndef execute(ctx):\n    return\n'

    with pytest.raises(ValidationFailed) as caught:
        upload(workflows, script)

    assert caught.value.status == 400
    assert [e["line"] for e in caught.value.details["errors"]] == [1, 4]
    assert "line 1" in caught.value.message and "line 4" in caught.value.message
    assert redis_db.dbsize() == 0


# Accounts


@pytest.fixture
def accounts(redis_db: redis.Redis) -> Accounts:
    return Accounts(redis_db)


def test_create_returns_an_fp_key_that_authenticates(accounts: Accounts) -> None:
    account, key, created = accounts.create("  acme  ")

    assert created
    assert key.startswith("fp_") and len(key) > 32
    assert account.name == "acme"
    assert accounts.authenticate(key) == account
    assert Accounts(accounts.redis).authenticate(key) == account  # from Redis, not this object's memory


def test_only_the_sha256_of_a_key_is_stored(accounts: Accounts, redis_db: redis.Redis) -> None:
    account, key, _ = accounts.create("acme")

    stored = everything(redis_db)
    assert key.encode() not in stored
    assert key[3:].encode() not in stored  # nor the random part alone
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert redis_db.get(keys.api_key(digest)) == account.id.encode()


def test_second_key_of_an_account_names_the_same_account(accounts: Accounts) -> None:
    first, key_one, created_one = accounts.create("acme")
    second, key_two, created_two = accounts.create("acme")

    assert created_one and not created_two
    assert first == second
    assert key_one != key_two
    assert accounts.authenticate(key_one) == accounts.authenticate(key_two) == first
    assert accounts.create("other")[0].id != first.id


@pytest.mark.parametrize("key", [None, "", "fp_not-a-key", "x" * 300])
def test_missing_or_unknown_key_is_an_authentication_error(accounts: Accounts, key: str | None) -> None:
    accounts.create("acme")

    with pytest.raises(AuthenticationError) as caught:
        accounts.authenticate(key)
    assert caught.value.status == 401


def test_blank_account_name_is_refused(accounts: Accounts, redis_db: redis.Redis) -> None:
    with pytest.raises(ValueError):
        accounts.create("   ")
    assert redis_db.dbsize() == 0


# Result cache


@pytest.fixture
def cache(redis_db: redis.Redis) -> ResultCache:
    return ResultCache(redis_db, ServerKey(redis_db, None))


REQUEST = {"input": {"query": "q", "options": {"a": 1, "b": [1, 2]}}, "messages": None, "max_tokens": 64,
           "temperature": 0.2, "metadata": {"team": "x"}}


def cache_key(cache: ResultCache, request: dict[str, Any] = REQUEST, secrets: dict[str, str] | None = None,
              account: str = ACCOUNT, content_hash: str = "c" * 64, config_hash: str = "e" * 64) -> str:
    return cache.key(account, content_hash, config_hash, request, secrets)


def begin(client: redis.Redis, account: str, key: str, request_id: str, ttl: float = 10) -> tuple[str, Any]:
    """Start run ``request_id`` for cache key ``key`` the way the API does."""
    runs = RunStore(client, ttl_seconds=60, runs_per_workflow=10)
    return runs.begin(RunRecord(request_id=request_id, account=account, workflow="wf", status=RunStatus.QUEUED),
                      cache_keys=ResultCache.redis_keys(account, key), lock_seconds=ttl)


def lead(client: redis.Redis, account: str, key: str, request_id: str, ttl: float = 10) -> str | None:
    """None when ``request_id`` now leads ``key``; else the request id of the run that does."""
    state, found = begin(client, account, key, request_id, ttl)
    assert state in ("queued", "join")
    return found


def test_cache_key_is_the_same_for_the_same_content_in_another_order(cache: ResultCache) -> None:
    reordered = {"metadata": {"team": "x"}, "temperature": 0.2, "max_tokens": 64, "messages": None,
                 "input": {"options": {"b": [1, 2], "a": 1}, "query": "q"}}

    assert cache_key(cache, reordered) == cache_key(cache, REQUEST)
    assert cache_key(cache, secrets={"a": "1", "b": "2"}) == cache_key(cache, secrets={"b": "2", "a": "1"})
    assert cache_key(cache, dict(REQUEST, stream=True)) == cache_key(cache)  # streaming changes no output


@pytest.mark.parametrize("change", [
    {"input": {"query": "other"}}, {"messages": [{"role": "user", "content": "hi"}]}, {"max_tokens": 65},
    {"temperature": 0.3}, {"metadata": {"team": "y"}},
])
def test_cache_key_changes_with_anything_that_decides_the_output(cache: ResultCache, change: dict[str, Any]) -> None:
    assert cache_key(cache, {**REQUEST, **change}) != cache_key(cache)


def test_cache_key_changes_with_account_version_config_and_secrets(cache: ResultCache) -> None:
    base = cache_key(cache)
    variants = [
        cache_key(cache, account=OTHER_ACCOUNT), cache_key(cache, content_hash="d" * 64),
        cache_key(cache, config_hash="f" * 64), cache_key(cache, secrets={"token": "one"}),
        cache_key(cache, secrets={"token": "two"}),
    ]
    assert len({base, *variants}) == 6


def test_cache_key_is_a_hash_and_no_secret_is_stored(cache: ResultCache, redis_db: redis.Redis) -> None:
    secret = "sk-live-very-secret-value"
    key = cache_key(cache, secrets={"token": secret})
    pipe = redis_db.pipeline()
    cache.put(pipe, ACCOUNT, key, {"output": "ok"}, ttl=60)
    pipe.execute()
    lead(redis_db, ACCOUNT, cache_key(cache, secrets={"token": secret, "other": "x"}), "req_1")

    assert len(key) == 64 and int(key, 16) >= 0
    assert secret not in key
    assert secret.encode() not in everything(redis_db)
    # The secrets' keyed hash uses a key generated once per Redis: another API process agrees.
    assert ResultCache(redis_db, ServerKey(redis_db, None)).key(ACCOUNT, "c" * 64, "e" * 64, REQUEST,
                                                      {"token": secret}) == key


def test_configured_secret_key_is_used_and_never_stored(redis_db: redis.Redis) -> None:
    one = ResultCache(redis_db, ServerKey(redis_db, "configured-one"))
    two = ResultCache(redis_db, ServerKey(redis_db, "configured-two"))
    secrets = {"token": "abc"}

    assert cache_key(one, secrets=secrets) != cache_key(two, secrets=secrets)
    assert cache_key(one) == cache_key(two)  # without secrets the key is keyless
    assert not redis_db.exists(keys.SECRET)
    assert b"configured-one" not in everything(redis_db)


def test_a_put_entry_is_a_hit_for_its_account_with_its_ttl(cache: ResultCache, redis_db: redis.Redis) -> None:
    key = cache_key(cache)
    assert begin(redis_db, ACCOUNT, key, "req_1")[0] == "queued"
    pipe = redis_db.pipeline()
    cache.put(pipe, ACCOUNT, key, {"output": {"answer": 42}, "chunks": []}, ttl=60)
    pipe.execute()

    # Without stored record fields the caller records the hit itself.
    assert begin(redis_db, ACCOUNT, key, "req_2") == ("hit-unrecorded", {"output": {"answer": 42}, "chunks": []})
    assert begin(redis_db, OTHER_ACCOUNT, key, "req_3")[0] == "queued"
    assert not redis_db.exists(keys.run("req_2"))
    assert 0 < redis_db.ttl(keys.cache(ACCOUNT, key)) <= 60


def test_a_hit_writes_its_own_run_record_in_the_same_call(cache: ResultCache, redis_db: redis.Redis) -> None:
    key = cache_key(cache)
    pipe = redis_db.pipeline()
    cache.put(pipe, ACCOUNT, key, {"output": [], "chunks": []}, ttl=60,
              record_fields=RunStore.hit_fields("req_0", "1.2.3", [], {"total_tokens": 5}, 0))
    pipe.execute()

    state, entry = begin(redis_db, ACCOUNT, key, "req_9")
    assert (state, entry) == ("hit", {"output": [], "chunks": []})
    record = RunStore(redis_db, ttl_seconds=60, runs_per_workflow=10).get("req_9")
    assert record is not None
    assert record.status == "succeeded" and record.cache_hit is True
    assert record.origin_request_id == "req_0" and record.version == "1.2.3"
    assert record.output == [] and record.usage == {"total_tokens": 5}  # an empty list stays a list
    assert record.started_at == record.finished_at
    assert 0 < redis_db.ttl(ResultCache.redis_keys(ACCOUNT, key)[2]) <= 60


def test_begin_is_single_flight_and_only_the_leader_releases(cache: ResultCache, redis_db: redis.Redis) -> None:
    key = cache_key(cache)

    assert lead(redis_db, ACCOUNT, key, "req_1") is None
    assert lead(redis_db, ACCOUNT, key, "req_2") == "req_1"
    assert lead(redis_db, OTHER_ACCOUNT, key, "req_3") is None  # another account leads on its own

    cache.release(ACCOUNT, key, "req_2")  # not the leader: nothing happens
    assert lead(redis_db, ACCOUNT, key, "req_4") == "req_1"

    cache.release(ACCOUNT, key, "req_1")
    assert lead(redis_db, ACCOUNT, key, "req_5") is None
    assert lead(redis_db, ACCOUNT, key, "req_6") == "req_5"


def test_the_single_flight_lock_expires_with_its_ttl(cache: ResultCache, redis_db: redis.Redis) -> None:
    key = cache_key(cache)
    lead(redis_db, ACCOUNT, key, "req_1", ttl=2.5)

    assert 0 < redis_db.pttl(keys.inflight(ACCOUNT, key)) <= 2500


def test_release_in_a_pipeline_takes_effect_on_execute(cache: ResultCache, redis_db: redis.Redis) -> None:
    key = cache_key(cache)
    lead(redis_db, ACCOUNT, key, "req_1")
    pipe = redis_db.pipeline()
    cache.release(ACCOUNT, key, "req_1", pipe=pipe)

    assert lead(redis_db, ACCOUNT, key, "req_2") == "req_1"
    pipe.execute()
    assert lead(redis_db, ACCOUNT, key, "req_2") is None


# Run store


@pytest.fixture
def runs(redis_db: redis.Redis) -> RunStore:
    return RunStore(redis_db, ttl_seconds=60, runs_per_workflow=3)


@pytest.fixture(autouse=True)
def _json_values_only(redis_db: redis.Redis) -> Iterator[None]:
    """Every run-record field the stores write is JSON (or the bare status)."""
    yield
    for key in redis_db.scan_iter(match="fp:run:*"):
        if redis_db.type(key) != b"hash":
            continue
        for field, value in redis_db.hgetall(key).items():
            if field != b"status":
                json.loads(value)


def queue_run(runs: RunStore, request_id: str, ref: str = "summarize", **fields: Any) -> None:
    pipe = runs.redis.pipeline()
    runs.create(pipe, RunRecord(**{"request_id": request_id, "account": ACCOUNT, "workflow": ref,
                                    "status": RunStatus.QUEUED, "version": "1.0.0", "queued_at": time.time(),
                                    **fields}))
    pipe.execute()


def queued(request_id: str) -> RunRecord:
    """The record the API queues for a run of workflow summarize."""
    return RunRecord(request_id=request_id, account=ACCOUNT, workflow="summarize", status=RunStatus.QUEUED,
                     version="1.0.0")


def finish_run(runs: RunStore, request_id: str, output: Any = "ok") -> None:
    """End a claimed run as its worker does, under the claim it holds."""
    claim = json.loads(runs.redis.hget(keys.run(request_id), "claim") or '""')
    pipe = runs.redis.pipeline()
    runs.finish(pipe, request_id, RunEnd(status="succeeded", version="1.0.0", output=output), {"output": output},
                claim=claim)
    pipe.execute()


def test_create_writes_a_queued_record_that_expires(runs: RunStore, redis_db: redis.Redis) -> None:
    queue_run(runs, "req_1", metadata={"team": "x"}, cache_hit=False)

    record = runs.get("req_1")
    assert record is not None
    assert record.status == "queued"
    assert (record.request_id, record.account, record.workflow) == ("req_1", ACCOUNT, "summarize")
    assert record.metadata == {"team": "x"} and record.cache_hit is False
    assert redis_db.hget(keys.run("req_1"), "status") == b"queued"  # stored as-is, not as JSON
    assert 0 < redis_db.pttl(keys.run("req_1")) <= 60_000
    assert runs.get("req_unknown") is None


def test_runs_of_a_workflow_are_listed_newest_first_and_trimmed(runs: RunStore) -> None:
    for n in range(5):
        queue_run(runs, f"req_{n}", queued_at=1000.0 + n)

    ids, total = runs.list_for_workflow(ACCOUNT, "summarize", 0, 25)
    assert total == 3
    assert ids == ["req_4", "req_3", "req_2"]
    assert runs.list_for_workflow(ACCOUNT, "summarize", 1, 1) == (["req_3"], 3)
    assert runs.list_for_workflow(ACCOUNT, "other", 0, 25) == ([], 0)


def test_claim_works_only_once_on_a_queued_run(runs: RunStore, redis_db: redis.Redis) -> None:
    queue_run(runs, "req_1")

    assert runs.claim("req_1", "worker-a", lease_ms=5000)
    assert not runs.claim("req_1", "worker-b", lease_ms=5000)

    record = runs.get("req_1")
    assert record is not None and record.status == "running" and record.worker == "worker-a"
    assert isinstance(record.started_at, float)
    assert 0 < redis_db.pttl(keys.run_lease("req_1")) <= 5000


def test_claim_of_an_unknown_or_finished_run_does_nothing(runs: RunStore, redis_db: redis.Redis) -> None:
    assert not runs.claim("req_unknown", "worker-a", lease_ms=5000)
    assert redis_db.dbsize() == 0

    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=5000)
    finish_run(runs, "req_1")
    assert not runs.claim("req_1", "worker-b", lease_ms=5000)
    assert runs.get("req_1").status == "succeeded"  # type: ignore[union-attr]


def test_finish_records_the_end_writes_a_done_event_and_drops_the_lease(runs: RunStore,
                                                                        redis_db: redis.Redis) -> None:
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=5000)
    runs.add_chunks("req_1", [("progress", "drafted", 0), ("partial", {"n": 1}, 1)])
    finish_run(runs, "req_1", output={"answer": 42})

    events = list(runs.events("req_1", queue_wait=1, run_seconds=1, poll=0.05))
    seen = [data for _, kind, data in events if kind == "chunk"]
    done = events[-1][2]

    assert [kind for _, kind, _ in events] == ["chunk", "chunk", "done"]
    # Resuming after the first chunk's id gives the rest.
    assert [kind for _, kind, _ in runs.events("req_1", 1, 1, poll=0.05, after=events[0][0])] == ["chunk", "done"]
    assert done == runs.wait("req_1", queue_wait=1, run_seconds=1, poll=0.05)
    assert done.to_message() == {"status": "succeeded", "version": "1.0.0", "output": {"answer": 42}}
    assert seen == [{"type": "progress", "content": "drafted", "index": 0},
                    {"type": "partial", "content": {"n": 1}, "index": 1}]
    assert runs.chunks("req_1") == [{"type": "progress", "content": "drafted"}, {"type": "partial", "content": {"n": 1}}]
    record = runs.get("req_1")
    assert record is not None and record.status == "succeeded" and record.output == {"answer": 42}
    assert not redis_db.exists(keys.run_lease("req_1"))
    assert 0 < redis_db.pttl(keys.run_events("req_1")) <= 60_000


def test_events_follow_a_run_that_finishes_later(runs: RunStore) -> None:
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=10_000)
    seen: list[dict[str, Any]] = []

    def work() -> None:
        time.sleep(0.2)
        runs.add_chunks("req_1", [("progress", 1, 0)])
        time.sleep(0.2)
        finish_run(runs, "req_1")

    worker = threading.Thread(target=work)
    worker.start()
    try:
        for _, kind, data in runs.events("req_1", queue_wait=10, run_seconds=10, poll=0.05):
            if kind == "chunk":
                seen.append(data)
            done = data
    finally:
        worker.join()

    assert done.status == "succeeded"
    assert seen == [{"type": "progress", "content": 1, "index": 0}]


def test_abandon_of_a_running_run_with_a_live_lease_does_nothing(runs: RunStore, redis_db: redis.Redis) -> None:
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=10_000)

    assert not runs.abandon("req_1", RunStatus.RUNNING, WorkerLost("gone"), "1.0.0")

    assert runs.get("req_1").status == "running"  # type: ignore[union-attr]
    assert not redis_db.exists(keys.run_events("req_1"))


def test_abandon_of_a_running_run_without_lease_marks_it_lost_and_wait_returns_the_end(
        runs: RunStore, redis_db: redis.Redis) -> None:
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=10_000)
    redis_db.delete(keys.run_lease("req_1"))  # what a dead worker leaves: its lease runs out

    assert runs.abandon("req_1", RunStatus.RUNNING, WorkerLost("the worker died"), "1.0.0")
    assert not runs.abandon("req_1", RunStatus.RUNNING, WorkerLost("again"), "1.0.0")  # once only

    record = runs.get("req_1")
    assert record is not None and record.status == "lost"
    assert record.error == {"kind": "WorkerLost", "message": "the worker died"}
    done = runs.wait("req_1", queue_wait=1, run_seconds=1, poll=0.05)
    assert done.to_message() == {"status": "lost", "version": "1.0.0",
                                 "error": {"kind": "WorkerLost", "message": "the worker died"}}
    assert len(redis_db.xrange(keys.run_events("req_1"))) == 1


def test_abandon_of_a_queued_run_marks_it_expired(runs: RunStore) -> None:
    queue_run(runs, "req_1")

    assert runs.abandon("req_1", RunStatus.QUEUED, RunNotStarted("no worker"), "1.0.0")

    assert runs.get("req_1").status == "expired"  # type: ignore[union-attr]
    assert not runs.claim("req_1", "worker-a", lease_ms=5000)  # a worker coming late skips it
    done = runs.wait("req_1", queue_wait=1, run_seconds=1, poll=0.05)
    assert done.status == "expired" and done.error["kind"] == "RunNotStarted"


def test_abandon_expecting_another_state_does_nothing(runs: RunStore) -> None:
    queue_run(runs, "req_1")
    assert not runs.abandon("req_1", RunStatus.RUNNING, WorkerLost("x"), "1.0.0")
    runs.claim("req_1", "worker-a", lease_ms=5000)
    finish_run(runs, "req_1")
    assert not runs.abandon("req_1", RunStatus.RUNNING, WorkerLost("x"), "1.0.0")
    assert not runs.abandon("req_1", RunStatus.QUEUED, RunNotStarted("x"), "1.0.0")

    assert runs.get("req_1").status == "succeeded"  # type: ignore[union-attr]


def test_wait_drops_a_run_no_worker_claims_in_time(runs: RunStore) -> None:
    queue_run(runs, "req_1")

    with pytest.raises(RunNotStarted):
        runs.wait("req_1", queue_wait=0.2, run_seconds=10, poll=0.05)

    assert runs.get("req_1").status == "expired"  # type: ignore[union-attr]
    assert not runs.claim("req_1", "worker-a", lease_ms=5000)
    # Another waiter of the same run (a single-flight joiner) gets the end, not a hang.
    assert runs.wait("req_1", queue_wait=0.2, run_seconds=10, poll=0.05).status == "expired"


def test_wait_takes_a_run_whose_lease_ran_out_for_lost(runs: RunStore) -> None:
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=100)  # and nobody refreshes it

    with pytest.raises(WorkerLost):
        runs.wait("req_1", queue_wait=10, run_seconds=10, poll=0.05)

    assert runs.get("req_1").status == "lost"  # type: ignore[union-attr]


def test_wait_gives_up_on_a_run_past_its_deadline_even_with_a_live_lease(runs: RunStore) -> None:
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=60_000)  # the worker is alive, the run is stuck
    outcome: dict[str, Any] = {}

    def waiter() -> None:
        try:
            outcome["done"] = runs.wait("req_1", queue_wait=10, run_seconds=0.3, poll=0.05)
        except WorkerLost as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    thread.join(10)

    assert not thread.is_alive(), "wait went on past run_seconds"
    assert isinstance(outcome.get("error"), WorkerLost)
    assert runs.get("req_1").status == "lost"  # type: ignore[union-attr]


# begin: cache lookup, single flight and the record in one step


def test_begin_without_cache_queues_the_run(runs: RunStore) -> None:
    state, found = runs.begin(queued("req_1"))

    assert (state, found) == ("queued", None)
    assert runs.get("req_1").status == "queued"  # type: ignore[union-attr]
    assert runs.list_for_workflow(ACCOUNT, "summarize", 0, 25) == (["req_1"], 1)


def test_begin_answers_hit_join_or_queued(runs: RunStore, redis_db: redis.Redis) -> None:
    cache = ResultCache(redis_db, ServerKey(redis_db, None))
    key = cache_key(cache)
    cache_keys = ResultCache.redis_keys(ACCOUNT, key)

    assert runs.begin(queued("req_1"), cache_keys, lock_seconds=10) == ("queued", None)
    assert runs.begin(queued("req_2"), cache_keys, lock_seconds=10) == ("join", "req_1")
    assert runs.get("req_2") is None  # a joiner starts no run
    assert 0 < redis_db.pttl(keys.inflight(ACCOUNT, key)) <= 10_000

    pipe = redis_db.pipeline()
    cache.put(pipe, ACCOUNT, key, {"output": "cached"}, ttl=60)
    cache.release(ACCOUNT, key, "req_1", pipe=pipe)
    pipe.execute()
    assert runs.begin(queued("req_3"), cache_keys, lock_seconds=10) == (
        "hit-unrecorded", {"output": "cached"})
    assert runs.get("req_3") is None  # an entry without record fields: the caller writes the hit's record
    assert runs.list_for_workflow(ACCOUNT, "summarize", 0, 25) == (["req_1"], 1)


def test_run_record_fields_round_trip_as_json(runs: RunStore) -> None:
    fields = {"logs": [{"level": "info", "msg": "ünïcode ✓", "time": 1.5}], "usage": {"total_tokens": 3},
              "error": None, "output": {"nested": [1, None, True]}}
    queue_run(runs, "req_1", **fields)

    record = runs.get("req_1")
    assert record is not None
    assert record.logs == fields["logs"] and record.usage == fields["usage"]
    assert record.output == fields["output"]
    assert b"error" not in runs.redis.hgetall(keys.run("req_1"))  # None fields are not written


# Unfinished runs: the index of deadlines, the reaper, and waiting through a Redis outage


def active(redis_db: redis.Redis) -> dict[str, float]:
    """The index of unfinished runs: request id -> deadline."""
    return {member.decode(): score for member, score in redis_db.zrange(keys.RUNS_ACTIVE, 0, -1, withscores=True)}


def test_unfinished_runs_are_indexed_by_deadline_until_they_end(runs: RunStore, redis_db: redis.Redis) -> None:
    before = time.time()
    runs.begin(RunRecord(request_id="req_1", account=ACCOUNT, workflow="summarize", status=RunStatus.QUEUED,
                         version="1.0.0", queued_at=before), lock_seconds=70)
    assert active(redis_db)["req_1"] == pytest.approx(before + 70, abs=0.01)  # queue wait plus the run's time

    runs.claim("req_1", "worker-a", lease_ms=5000, hard_seconds=12)
    assert active(redis_db)["req_1"] == pytest.approx(time.time() + 12, abs=1)  # now by its hard limit
    finish_run(runs, "req_1")
    assert active(redis_db) == {}

    runs.begin(queued("req_2"), lock_seconds=10)
    runs.abandon("req_2", RunStatus.QUEUED, RunNotStarted("no worker"), "1.0.0")
    assert active(redis_db) == {}


def test_reaper_ends_runs_left_unfinished_past_their_deadline(runs: RunStore, redis_db: redis.Redis) -> None:
    queue_run(runs, "req_running")
    runs.claim("req_running", "worker-a", lease_ms=60_000, hard_seconds=0.1)  # a live lease does not save it
    runs.begin(queued("req_queued"), lock_seconds=0.1)
    runs.begin(queued("req_fresh"), lock_seconds=60)
    redis_db.zadd(keys.RUNS_ACTIVE, {"req_gone": 0})  # its record expired or was lost
    time.sleep(0.3)

    assert runs.reap(margin=0.1, every=60) == 2

    running, queued_run, fresh = runs.get("req_running"), runs.get("req_queued"), runs.get("req_fresh")
    assert running is not None and running.status == "lost"
    assert running.error["kind"] == "WorkerLost" and "0.1s past its hard time limit" in running.error["message"]
    assert queued_run is not None and queued_run.status == "expired"
    assert queued_run.error["kind"] == "RunNotStarted" and "expired" in queued_run.error["message"]
    assert fresh is not None and fresh.status == "queued"
    assert set(active(redis_db)) == {"req_fresh"}
    # A waiter that comes now gets the end the reaper wrote.
    assert runs.wait("req_running", queue_wait=1, run_seconds=1, poll=0.05).status == "lost"


def test_one_reaper_pass_per_interval_whoever_calls(runs: RunStore, redis_db: redis.Redis) -> None:
    assert runs.reap(margin=0, every=60) == 0
    runs.begin(queued("req_1"), lock_seconds=0)
    other = RunStore(redis_db, ttl_seconds=60, runs_per_workflow=3)  # another process's store

    assert other.reap(margin=0, every=60) == 0  # the pass of this interval is taken
    assert runs.get("req_1").status == "queued"  # type: ignore[union-attr]
    redis_db.delete(keys.RUNS_REAPER)
    assert other.reap(margin=0, every=60) == 1


def test_wait_gives_a_lapsed_lease_time_to_come_back(redis_db: redis.Redis) -> None:
    runs = RunStore(redis_db, ttl_seconds=60, runs_per_workflow=3, lease_grace_seconds=1.0)
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=10_000)
    redis_db.delete(keys.run_lease("req_1"))  # it ran out while Redis was paused

    def worker_back() -> None:
        time.sleep(0.4)
        redis_db.set(keys.run_lease("req_1"), "worker-a", px=10_000)  # its next heartbeat
        time.sleep(0.8)  # longer than the grace, counted from the lease's return
        finish_run(runs, "req_1", output="real")

    thread = threading.Thread(target=worker_back)
    thread.start()
    try:
        end = runs.wait("req_1", queue_wait=10, run_seconds=10, poll=0.05)
    finally:
        thread.join()
    assert (end.status, end.output) == ("succeeded", "real")


def test_wait_takes_a_run_for_lost_once_its_lease_stays_gone_past_the_grace(redis_db: redis.Redis) -> None:
    runs = RunStore(redis_db, ttl_seconds=60, runs_per_workflow=3, lease_grace_seconds=0.3)
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=50)

    with pytest.raises(WorkerLost):
        runs.wait("req_1", queue_wait=10, run_seconds=10, poll=0.05)
    assert runs.get("req_1").status == "lost"  # type: ignore[union-attr]


def test_wait_names_the_run_when_redis_stays_unreachable_past_its_deadline() -> None:
    server = RedisServer().start()
    client = redis.Redis(port=server.port, socket_connect_timeout=0.2)
    try:
        runs = RunStore(client, ttl_seconds=60, runs_per_workflow=3, outage_seconds=0.5)
        queue_run(runs, "req_1")
        runs.claim("req_1", "worker-a", lease_ms=60_000)
        server.stop()

        started = time.monotonic()
        with pytest.raises(OutcomeUnavailable) as caught:
            runs.wait("req_1", queue_wait=0.2, run_seconds=0.2, poll=0.05)
        assert caught.value.details["request_id"] == "req_1"
        assert caught.value.status == 503 and not caught.value.retry_safe
        assert time.monotonic() - started < 30  # bounded: it does not wait for Redis forever
    finally:
        client.close()
        server.stop()


# Writes Redis ran although their answer was lost (a timeout), tried again.

def test_a_claim_tried_again_with_its_token_holds_and_no_other_delivery_gets_it(runs: RunStore) -> None:
    queue_run(runs, "req_1")
    assert runs.claim("req_1", "worker-a", lease_ms=5000, token="delivery-1")
    assert runs.claim("req_1", "worker-a", lease_ms=5000, token="delivery-1")  # the retry of a claim Redis ran
    assert not runs.claim("req_1", "worker-a", lease_ms=5000, token="delivery-2")  # a second delivery, same worker
    assert not runs.claim("req_1", "worker-b", lease_ms=5000)


def _end(runs: RunStore, request_id: str, claim: str, output: Any) -> None:
    pipe = runs.redis.pipeline()
    runs.finish(pipe, request_id, RunEnd(status="succeeded", version="1.0.0", output=output), {"output": output},
                claim=claim)
    pipe.execute()


def test_an_end_is_written_once_and_only_by_the_claim_that_runs_it(runs: RunStore, redis_db: redis.Redis) -> None:
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=5000, token="delivery-1")
    _end(runs, "req_1", "delivery-2", "not mine")  # another delivery's end is not written
    assert runs.get("req_1").status == "running"  # type: ignore[union-attr]
    _end(runs, "req_1", "delivery-1", "mine")
    _end(runs, "req_1", "delivery-1", "mine")  # written again after its answer was lost
    dones = [f for _, f in redis_db.xrange(keys.run_events("req_1")) if f[b"kind"] == b"done"]
    assert len(dones) == 1 and runs.get("req_1").output == "mine"  # type: ignore[union-attr]
    assert redis_db.hget(keys.METRICS, "runs:succeeded") == b"1"


def test_a_run_already_ended_as_lost_keeps_that_end(runs: RunStore) -> None:
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=5000, token="delivery-1")
    assert runs.abandon("req_1", RunStatus.RUNNING, WorkerLost("gone"), "1.0.0", force=True)
    _end(runs, "req_1", "delivery-1", "late")  # the worker comes back after an outage
    record = runs.get("req_1")
    assert record is not None and record.status == "lost" and record.output is None
    end = runs.end_of("req_1")
    assert end is not None and end.status == "lost"


def test_a_batch_of_chunks_written_again_is_stored_once(runs: RunStore, redis_db: redis.Redis) -> None:
    queue_run(runs, "req_1")
    runs.claim("req_1", "worker-a", lease_ms=10_000)
    runs.add_chunks("req_1", [("step", "a", 0), ("step", "b", 1)])
    runs.add_chunks("req_1", [("step", "a", 0), ("step", "b", 1), ("step", "c", 2)])  # written again, with a new one
    runs.add_chunks("req_1", [("step", "c", 2)])
    finish_run(runs, "req_1")
    runs.add_chunks("req_1", [("step", "late", 3)])  # after the end: not taken
    assert redis_db.xlen(keys.run_events("req_1")) == 4
    seen = [data["content"] for _, kind, data in runs.events("req_1", queue_wait=1, run_seconds=1, poll=0.05)
            if kind == "chunk"]
    assert seen == ["a", "b", "c"]
    assert [c["content"] for c in runs.chunks("req_1")] == ["a", "b", "c"]


def test_a_record_written_already_ended_is_not_indexed_as_unfinished(runs: RunStore, redis_db: redis.Redis) -> None:
    now = time.time()
    runs.begin(RunRecord(request_id="req_hit", account=ACCOUNT, workflow="summarize", status=RunStatus.SUCCEEDED,
                         version="1.0.0", cache_hit=True, queued_at=now, started_at=now, finished_at=now),
               lock_seconds=70)
    assert runs.get("req_hit").status == "succeeded"  # type: ignore[union-attr]
    assert "req_hit" not in active(redis_db)
