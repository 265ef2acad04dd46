"""Drafts, workflow ids and the applications an upload creates, in the Workflows store against a real Redis."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
import redis

from flowpool import keys
from flowpool.errors import Conflict, NotFound
from flowpool.registry import Applications, Upload, Workflows

ACCOUNT = "acct-1"


def _script(n: int) -> str:
    return f"def execute(ctx):\n    return {n}\n"


def _everything(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key of the database with its serialized value: equal when nothing was written."""
    return {key: client.dump(key) for key in client.scan_iter()}


def _run_threads(count: int, work: Callable[[int], None]) -> list[str]:
    """Run ``work(i)`` for i in range(count) on threads at once; the errors they raised."""
    errors: list[str] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except Exception as exc:  # noqa: BLE001 - reported by the test, which fails on any
            errors.append(repr(exc))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


# Drafts


def test_racing_draft_uploads_publishes_and_activations_lose_no_version_and_never_activate_a_draft(
        redis_db: redis.Redis) -> None:
    port = redis_db.connection_pool.connection_kwargs["port"]
    Workflows(redis_db).upload(ACCOUNT, Upload(ref="race", script=_script(0)))
    drafted: set[str] = set()
    published: set[str] = {"1.0.0"}
    lock = threading.Lock()

    def work(i: int) -> None:
        with redis.Redis(port=port, db=15) as client:  # a connection of its own, as each API process has
            workflows = Workflows(client)
            for j in range(25):
                publish = j % 3 == 0
                _, version, created = workflows.upload(ACCOUNT, Upload(
                    ref="race", script=_script(i * 1000 + j + 1), publish_version=publish,
                    timeout_seconds=float(j + 1)))
                assert created and version["draft"] is not publish
                with lock:
                    (published if publish else drafted).add(version["version"])
                if j % 4 == 1:
                    workflows.activate(ACCOUNT, "race", version["version"])
                    with lock:
                        published.add(version["version"])

    assert _run_threads(6, work) == []
    versions = [v.decode() for v in redis_db.zrange(keys.versions(ACCOUNT, "race"), 0, -1)]
    assert len(versions) == len(set(versions)) == 1 + 6 * 25  # each upload its own version, none overwritten
    assert set(versions) == drafted | published
    hashes = {k.decode(): v.decode() for k, v in redis_db.hgetall(keys.version_hashes(ACCOUNT, "race")).items()}
    assert sorted(hashes.values()) == sorted(versions)
    flagged = set()
    for number in versions:
        meta, draft = redis_db.hmget(keys.version(ACCOUNT, "race", number), "meta", "draft")
        assert hashes[json.loads(meta)["content_hash"]] == number
        if draft:
            flagged.add(number)
    assert flagged == drafted - published  # a draft stays one until it is activated, then never again
    active = redis_db.hget(keys.workflow(ACCOUNT, "race"), "active").decode()
    assert active in published and active not in flagged
    listed = {v["version"]: v["draft"] for v in Workflows(redis_db).versions(ACCOUNT, "race", 0, 1000)[0]}
    assert {number for number, draft in listed.items() if draft} == flagged


def test_a_draft_uploaded_again_takes_the_fields_given_now_over_those_it_had(redis_db: redis.Redis) -> None:
    workflows = Workflows(redis_db)
    workflows.upload(ACCOUNT, Upload(ref="w", script=_script(1), env={"MODE": "live"}))
    first = Upload(ref="w", script=_script(2), publish_version=False, env={"MODE": "v1"}, description="next")
    assert workflows.store(ACCOUNT, first).created
    rev = redis_db.hget(keys.workflow(ACCOUNT, "w"), "rev")

    again = workflows.store(ACCOUNT, Upload(ref="w", script=_script(2), publish_version=False,
                                            env={"MODE": "v2-fixed"}, timeout_seconds=7))

    assert again.created is False and again.version["draft"] is True and again.version["version"] == "1.1.0"
    assert again.published is not None and again.published["version"] == "1.0.0"
    pinned = workflows.resolve(ACCOUNT, "w", "1.1.0")
    assert pinned.env == {"MODE": "v2-fixed"} and pinned.timeout_seconds == 7
    assert redis_db.hget(keys.workflow(ACCOUNT, "w"), "rev") != rev  # an invocation resolved before sees it
    assert workflows.resolve(ACCOUNT, "w").env == {"MODE": "live"}  # live invocations see nothing of it
    activated = workflows.activate(ACCOUNT, "w", "1.1.0")
    assert (activated["description"], activated["timeout_seconds"]) == ("next", 7)
    assert workflows.resolve(ACCOUNT, "w").env == {"MODE": "v2-fixed"}
    assert redis_db.hmget(keys.version(ACCOUNT, "w", "1.1.0"), "draft", "settings") == [None, None]


def test_a_draft_upload_of_a_published_versions_content_is_a_409_that_changes_nothing(
        redis_db: redis.Redis) -> None:
    workflows = Workflows(redis_db)
    workflows.upload(ACCOUNT, Upload(ref="w", script=_script(1), timeout_seconds=30))
    workflows.upload(ACCOUNT, Upload(ref="w", script=_script(2)))
    before = _everything(redis_db)

    with pytest.raises(Conflict) as refused:
        workflows.upload(ACCOUNT, Upload(ref="w", script=_script(1), publish_version=False, timeout_seconds=5,
                                         application_name="Made Up"))

    assert refused.value.status == 409 and refused.value.details["version"] == "1.0.0"
    assert "version 1.0.0" in refused.value.message and "publish_version true" in refused.value.message
    assert _everything(redis_db) == before  # no settings, no application, no id
    # Published, the same content takes the settings.
    _, version, created = workflows.upload(ACCOUNT, Upload(ref="w", script=_script(1), timeout_seconds=5))
    assert not created and version["active"] and workflows.get(ACCOUNT, "w")["timeout_seconds"] == 5


# Ids


def test_a_workflow_written_before_ids_gets_one_on_its_first_read_however_many_read_at_once(
        redis_db: redis.Redis) -> None:
    port = redis_db.connection_pool.connection_kwargs["port"]
    workflows = Workflows(redis_db)
    for ref in ("a", "b"):
        workflows.upload(ACCOUNT, Upload(ref=ref, script=_script(1)))
    redis_db.hdel(keys.workflow(ACCOUNT, "b"), "id")  # as a workflow written before ids was
    seen: list[int] = []

    def read(i: int) -> None:
        with redis.Redis(port=port, db=15) as client:
            reader = Workflows(client)
            found = reader.get(ACCOUNT, "b") if i % 2 else reader.list(ACCOUNT, 0, 10)[0][1]
            seen.append(found["id"])

    assert _run_threads(8, read) == []
    assert len(set(seen)) == 1 and isinstance(seen[0], int)
    assert redis_db.hget(keys.workflow(ACCOUNT, "b"), "id") == str(seen[0]).encode()
    assert seen[0] != workflows.get(ACCOUNT, "a")["id"]
    assert workflows.upload(ACCOUNT, Upload(ref="b", script=_script(2)))[0]["id"] == seen[0]


# Applications


def test_an_upload_creates_the_application_it_names_and_delete_removes_it(redis_db: redis.Redis) -> None:
    workflows, applications = Workflows(redis_db), Applications(redis_db)
    workflows.upload(ACCOUNT, Upload(ref="w", script=_script(1), application_name="Suport Desk"))
    assert applications.get(ACCOUNT, "Suport Desk").intents == {}

    applications.delete(ACCOUNT, "Suport Desk")

    assert applications.list(ACCOUNT, 0, 10) == ([], 0)
    with pytest.raises(NotFound):
        applications.delete(ACCOUNT, "Suport Desk")
