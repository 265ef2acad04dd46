"""Datastore replicas when the world changes under them: Redis loses writes, another host deletes the store, one
store opens slowly, a snapshot runs under gevent."""
from __future__ import annotations

import socket
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


def indexed_counts(engine: Datastores) -> tuple[int, int]:
    """The replica's kept count of records in its fts index, and the count of fts_docsize's rows (a scan)."""
    [(found, _)] = engine._replicas.values()
    with found.reader() as conn:
        kept = conn.execute("SELECT value FROM meta WHERE key = 'indexed'").fetchone()[0]
        return kept, conn.execute("SELECT count(*) FROM fts_docsize").fetchone()[0]


def test_the_count_of_indexed_records_follows_upserts_deletes_and_resets(
        written: tuple[Datastores, ...], redis_db: redis.Redis) -> None:
    writer, reader, _ = written
    assert indexed_counts(writer) == (4, 4)
    writer.ingest(ACCOUNT, "docs", [{"id": "r2", "vec": [1.0, 0.0]}, {"id": "r9", "vec": [1.0, 0.0]}])  # no text
    writer.ingest(ACCOUNT, "docs", [record(9)])
    writer.delete_records(ACCOUNT, "docs", ["r1", "r2", "nothing"])
    assert indexed_counts(writer) == (3, 3)  # r3, r4, r9
    lose_last_batch(redis_db)
    assert reader.get_record(ACCOUNT, "docs", "r1") is not None  # the reader catches up; the writer resets
    assert writer.get_record(ACCOUNT, "docs", "r1") is not None
    assert indexed_counts(writer) == indexed_counts(reader) == (4, 4)  # r1, r3, r4, r9 (r2 has no text)


def test_a_process_past_the_head_it_read_does_not_take_the_locks(written: tuple[Datastores, ...]) -> None:
    writer, _, _ = written
    [(found, manifest)] = writer._replicas.values()
    _, head, tail = writer.manifests.head(ACCOUNT, "docs")

    def no_log(after: int, upto: int) -> list[str]:
        raise AssertionError("read the log")

    # A search that read head 2 before a concurrent write of this process applied batch 3: nothing to do.
    found.catch_up(head - 1, None, no_log, writer.blobs.get, lambda: (head, tail))
    # Redis lost batch 3: the head, read again, is still 2; the replica is replayed.
    replayed: list[int] = []

    def log_now(after: int, upto: int) -> list[str]:
        replayed.append(after)
        return writer.manifests.batches(ACCOUNT, "docs", manifest.generation, after)[:upto - after]
    lose_last_batch(writer.manifests.redis)
    found.catch_up(head - 1, None, log_now, writer.blobs.get, lambda: (head - 1, tail))
    assert replayed and found.state.applied == head - 1


def test_another_replica_format_is_never_read(redis_db: redis.Redis, tmp_path: Path) -> None:
    writer = host(redis_db, tmp_path / "w", datastore_snapshot_batches=1000)
    writer.create(ACCOUNT, SPEC)
    writer.ingest(ACCOUNT, "docs", [record(1)])
    writer.ingest(ACCOUNT, "docs", [record(2)])
    manifest = writer.manifests.read(ACCOUNT, "docs")
    # What code of another format left: a snapshot (where 93afd35 put it) and a host's replica files.
    for name in ("replica.sqlite3", "vectors.f32"):
        writer.blobs.put(f"{manifest.prefix}snapshots/2/{name}", b"another format")
    assert writer.manifests.record_snapshot(manifest, 2)
    old = tmp_path / "r" / "datastores" / ACCOUNT / "docs" / manifest.generation
    old.mkdir(parents=True)
    (old / "replica.sqlite3").write_bytes(b"another format")

    reader = host(redis_db, tmp_path / "r")

    assert reader.get_record(ACCOUNT, "docs", "r2")["text"] == "apple 2"
    assert ids(reader, query="apple") == ["r1", "r2"]


def pause_after_the_head(monkeypatch: pytest.MonkeyPatch, engine: Datastores, thread_name: str,
                         paused: threading.Event, resume: threading.Event, when: Any = lambda found: True) -> None:
    """Make ``engine.manifests.head`` wait, in the thread of that name, after reading what ``when`` accepts."""
    real = engine.manifests.head

    def head(account_id: str, name: str) -> Any:
        found = real(account_id, name)
        if threading.current_thread().name == thread_name and when(found):
            paused.set()
            assert resume.wait(30)
        return found
    monkeypatch.setattr(engine.manifests, "head", head)


def in_thread(name: str, function: Any, *args: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            function(*args)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread, errors


def test_a_search_under_way_when_its_store_is_deleted_is_a_404(
        written: tuple[Datastores, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    writer, reader, _ = written
    paused, resume = threading.Event(), threading.Event()
    at_head = reader._replica_at_head

    def paused_at_head(account_id: str, name: str, deadline: float | None = None) -> Any:
        found = at_head(account_id, name, deadline)
        if threading.current_thread().name == "searcher":
            paused.set()
            assert resume.wait(30)
        return found
    monkeypatch.setattr(reader, "_replica_at_head", paused_at_head)
    searcher, errors = in_thread("searcher", reader.search, ACCOUNT, "docs", "apple")
    try:
        assert paused.wait(30)  # it has its replica at the head, and reads next
        writer.delete(ACCOUNT, "docs")
        with pytest.raises(DatastoreNotFound):  # this thread lets go of the replica: its files are removed
            reader.get_record(ACCOUNT, "docs", "r1")
    finally:
        resume.set()
        searcher.join(30)
    assert not searcher.is_alive()
    assert [type(error) for error in errors] == [DatastoreNotFound], errors


def test_a_thread_that_saw_the_store_gone_keeps_the_replica_of_the_one_created_again(
        written: tuple[Datastores, ...], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    writer, reader, _ = written
    writer.delete(ACCOUNT, "docs")
    paused, resume = threading.Event(), threading.Event()
    pause_after_the_head(monkeypatch, reader, "late", paused, resume, when=lambda found: found is None)
    late, errors = in_thread("late", reader.get_record, ACCOUNT, "docs", "r1")
    try:
        assert paused.wait(30)  # it saw the store gone, and has yet to let go of its replica
        writer.create(ACCOUNT, SPEC)
        writer.ingest(ACCOUNT, "docs", [record(7)])
        assert reader.get_record(ACCOUNT, "docs", "r7") is not None  # the new incarnation's replica
    finally:
        resume.set()
        late.join(30)
    assert not late.is_alive()
    assert [type(error) for error in errors] == [DatastoreNotFound]
    [(_, manifest)] = reader._replicas.values()
    assert manifest.generation == writer.manifests.read(ACCOUNT, "docs").generation
    assert [d.name for d in (tmp_path / "r" / "datastores" / ACCOUNT / "docs").iterdir()] == [manifest.generation]
    assert ids(reader, query="apple") == ["r7"]


def test_a_delete_whose_blobs_cannot_be_removed_still_deletes_the_store(
        written: tuple[Datastores, ...], redis_db: redis.Redis, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    _, reader, _ = written
    [directory] = (tmp_path / "r" / "datastores" / ACCOUNT / "docs").iterdir()
    with socket.socket() as closed:  # a port nothing listens on: the blob store is down
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    down = Datastores(redis_db, RedisBlobs(redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=5)),
                      Settings(cache_dir=str(tmp_path / "r")))

    down.delete(ACCOUNT, "docs")

    with pytest.raises(DatastoreNotFound):
        reader.get(ACCOUNT, "docs")
    assert not directory.exists()
    assert "removing its blobs" in caplog.text
