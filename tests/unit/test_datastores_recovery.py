"""Datastore replicas when the world changes under them: Redis loses writes, another host deletes the store, one
store opens slowly, a snapshot runs under gevent."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from flowpool import keys
from flowpool.blobs import RedisBlobs
from flowpool.datastores import DatastoreNotFound, Datastores, replica
from flowpool.redis_server import RedisServer
from flowpool.settings import Settings

ACCOUNT = "acct-a"
SPEC = {"name": "docs", "text_fields": ["text"], "vector_field": "vec", "vector_dims": 2}


def host(client: redis.Redis, cache: Path, **settings: Any) -> Datastores:
    return Datastores(client, RedisBlobs(client), Settings(cache_dir=str(cache), **settings))


def record(i: int, word: str = "apple", vec: list[float] | None = None) -> dict[str, Any]:
    return {"id": f"r{i}", "text": f"{word} {i}", "vec": vec or [1.0, float(i)]}


def lose_last_batch(client: redis.Redis) -> None:
    """What a Redis restart that lost its last second does to a store: the head and the log one batch back."""
    generation = client.hget(keys.datastore(ACCOUNT, "docs"), "generation").decode()
    log_key = keys.datastore_log(ACCOUNT, "docs", generation)
    client.rpop(log_key)
    head = client.llen(log_key)
    client.hset(keys.datastore(ACCOUNT, "docs"), mapping={"head": head, "tail": client.lindex(log_key, -1)})


@pytest.fixture
def written(redis_db: redis.Redis, tmp_path: Path) -> tuple[Datastores, Datastores, Datastores]:
    """A writer host, and a reader host with two processes (engines) sharing one replica, all at batch 3."""
    writer, reader, sibling = (host(redis_db, tmp_path / "w"), host(redis_db, tmp_path / "r"),
                               host(redis_db, tmp_path / "r"))
    writer.create(ACCOUNT, SPEC)
    writer.ingest(ACCOUNT, "docs", [record(1), record(2)])
    writer.ingest(ACCOUNT, "docs", [record(3)])
    writer.ingest(ACCOUNT, "docs", [record(1, "lost", [0.0, -1.0]), record(4, "lost", [0.0, -1.0])])
    for engine in (reader, sibling):
        assert engine.get_record(ACCOUNT, "docs", "r4") is not None
    return writer, reader, sibling


def ids(engine: Datastores, **search: Any) -> list[str]:
    return [hit["id"] for hit in engine.search(ACCOUNT, "docs", limit=10, **search)["data"]]


def test_a_replica_ahead_of_a_redis_that_lost_writes_replays_the_log(
        written: tuple[Datastores, ...], redis_db: redis.Redis) -> None:
    _, reader, sibling = written
    lose_last_batch(redis_db)

    for engine in (reader, sibling):  # the sibling finds the replica reset by the reader, and rebuilds its state
        assert engine.get_record(ACCOUNT, "docs", "r4") is None
        assert engine.get_record(ACCOUNT, "docs", "r1")["text"] == "apple 1"
        assert ids(engine, query="lost") == []
        assert ids(engine, vector=[0, -1]) == ["r1", "r2", "r3"]  # no dead row of the lost batch ranks


def test_a_replica_holding_another_batch_of_the_same_seq_replays_the_log(
        written: tuple[Datastores, ...], redis_db: redis.Redis) -> None:
    writer, reader, sibling = written
    lose_last_batch(redis_db)
    # The writer's own replica catches the loss on this write; the reader's sees head 3 again, another batch.
    writer.ingest(ACCOUNT, "docs", [record(5, "pear", [0.0, -1.0])])
    assert redis_db.hget(keys.datastore(ACCOUNT, "docs"), "head") == b"3"

    for engine in (reader, sibling, writer):
        assert engine.get_record(ACCOUNT, "docs", "r4") is None
        assert engine.get_record(ACCOUNT, "docs", "r5")["text"] == "pear 5"
        assert ids(engine, query="lost pear") == ["r5"]
        assert ids(engine, vector=[0, -1])[0] == "r5"


def test_a_store_deleted_on_another_host_is_let_go_here(written: tuple[Datastores, ...], tmp_path: Path) -> None:
    writer, reader, _ = written
    [directory] = (tmp_path / "r" / "datastores" / ACCOUNT / "docs").iterdir()

    writer.delete(ACCOUNT, "docs")

    with pytest.raises(DatastoreNotFound):
        reader.search(ACCOUNT, "docs", query="apple")
    assert reader._replicas == {}
    assert not directory.exists()


def test_a_slow_first_open_of_one_store_does_not_hold_up_another(redis_db: redis.Redis, tmp_path: Path) -> None:
    writer = host(redis_db, tmp_path / "w")
    for name in ("slow", "fast"):
        writer.create(ACCOUNT, {**SPEC, "name": name})
        writer.ingest(ACCOUNT, name, [record(1)])
    reader = host(redis_db, tmp_path / "r")
    seeding, release = threading.Event(), threading.Event()
    seeder = reader.snapshots.seeder

    def slow_seeder(manifest: Any) -> Any:
        def seed(db: Path, vectors: Path) -> bool:
            seeding.set()
            assert release.wait(30)
            return seeder(manifest)(db, vectors)
        return seed if manifest.spec.name == "slow" else seeder(manifest)
    reader.snapshots.seeder = slow_seeder  # type: ignore[method-assign]
    slow = threading.Thread(target=reader.get_record, args=(ACCOUNT, "slow", "r1"))
    fast = threading.Thread(target=reader.get_record, args=(ACCOUNT, "fast", "r1"))
    try:
        slow.start()
        assert seeding.wait(30)
        fast.start()
        fast.join(30)
        assert not fast.is_alive()  # it opened while "slow" was still downloading its snapshot
    finally:
        release.set()
        slow.join(30)
    assert not slow.is_alive()
    assert reader.get_record(ACCOUNT, "slow", "r1") is not None


def test_vector_norms_are_computed_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    rows[4] = 0
    monkeypatch.setattr(replica, "_NORM_CHUNK", 3)

    got = replica._inverse_norms(rows)

    expected = np.linalg.norm(rows, axis=1)
    assert got[4] == 0
    assert np.allclose(np.delete(got, 4), 1 / np.delete(expected, 4), rtol=1e-6)


SNAPSHOT_UNDER_GEVENT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import sys
    import gevent
    import redis
    from flowpool.blobs import RedisBlobs
    from flowpool.datastores import Datastores, replica
    from flowpool.settings import Settings

    real_sleep = monkey.get_original("time", "sleep")
    real_ident = monkey.get_original("threading", "get_ident")
    real_export = replica.Replica.export
    seen = {}

    def export(self, target):
        seen["thread"] = real_ident()
        before = ticks[0]
        real_sleep(0.5)  # a long VACUUM INTO: it must not stall the greenlets of the process meanwhile
        seen["ticks"] = ticks[0] - before
        return real_export(self, target)

    ticks = [0]
    def tick():
        while True:
            ticks[0] += 1
            gevent.sleep(0.005)

    replica.Replica.export = export
    client = redis.Redis(port=int(sys.argv[1]), db=15)
    engine = Datastores(client, RedisBlobs(client), Settings(cache_dir=sys.argv[2], datastore_snapshot_batches=1))
    gevent.spawn(tick)
    engine.create("acct-a", {"name": "docs", "text_fields": ["text"]})
    engine.ingest("acct-a", "docs", [{"id": "1", "text": "apple"}])
    engine.snapshots.wait(30)
    assert seen["thread"] != real_ident(), "the export ran on the hub's thread"
    assert seen["ticks"] > 0, "the export stalled the event loop"
    assert engine.manifests.snapshot_seq("acct-a", "docs") == 1
    print("ok")
""")


def test_a_snapshot_under_gevent_runs_on_an_os_thread(redis_server: RedisServer, redis_db: redis.Redis,
                                                      tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SNAPSHOT_UNDER_GEVENT, str(redis_server.port), str(tmp_path)],
                          capture_output=True, timeout=60)

    assert done.returncode == 0 and done.stdout.strip() == b"ok", done.stderr.decode()[-2000:]
