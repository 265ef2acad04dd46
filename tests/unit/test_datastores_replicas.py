"""Datastore replicas on several hosts: writes reach every one, crashes and snapshots lose nothing."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import redis

from flowpool.blobs import RedisBlobs
from flowpool.datastores import Datastores, replica
from flowpool.redis_server import RedisServer
from flowpool.settings import Settings

ACCOUNT = "acct-a"
SPEC = {"name": "docs", "text_fields": ["text"], "vector_field": "vec", "vector_dims": 2}


def host(client: redis.Redis, cache: Path, **settings: Any) -> Datastores:
    """One host's engine: its own cache directory, the shared Redis and blob store."""
    return Datastores(client, RedisBlobs(client), Settings(cache_dir=str(cache), **settings))


def record(i: int, word: str = "apple") -> dict[str, Any]:
    return {"id": f"r{i}", "text": f"{word} {i}", "vec": [1.0, float(i)]}


def test_two_hosts_each_see_the_others_writes_on_their_next_read(redis_db: redis.Redis, tmp_path: Path) -> None:
    a, b = host(redis_db, tmp_path / "a"), host(redis_db, tmp_path / "b")
    a.create(ACCOUNT, SPEC)
    a.ingest(ACCOUNT, "docs", [record(1)])
    assert b.get_record(ACCOUNT, "docs", "r1")["text"] == "apple 1"

    b.ingest(ACCOUNT, "docs", [record(1, "pear"), record(2)])
    a.delete_records(ACCOUNT, "docs", ["r2"])

    for engine in (a, b):
        assert engine.get_record(ACCOUNT, "docs", "r1")["text"] == "pear 1"
        assert engine.get_record(ACCOUNT, "docs", "r2") is None
        assert [h["id"] for h in engine.search(ACCOUNT, "docs", query="pear")["data"]] == ["r1"]
        assert engine.search(ACCOUNT, "docs", query="apple")["data"] == []
        assert engine.get(ACCOUNT, "docs")["records"] == 1


def test_concurrent_writers_on_two_hosts_lose_nothing_and_count_exactly(redis_db: redis.Redis,
                                                                         tmp_path: Path) -> None:
    a, b = host(redis_db, tmp_path / "a"), host(redis_db, tmp_path / "b")
    a.create(ACCOUNT, SPEC)
    errors: list[BaseException] = []

    def write(engine: Datastores, start: int) -> None:
        try:
            for i in range(start, start + 40, 4):  # overlapping ids: the count must not double them
                engine.ingest(ACCOUNT, "docs", [record(i), record(i + 1), record(i + 2)])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(engine, start))
               for engine, start in ((a, 0), (b, 0), (a, 20), (b, 20))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    expected = {f"r{i}" for start in (0, 20) for base in range(start, start + 40, 4) for i in range(base, base + 3)}
    view = b.get(ACCOUNT, "docs")
    assert view["records"] == len(expected) and view["version"] == 40
    for engine in (a, b):
        hits = engine.search(ACCOUNT, "docs", query="apple", limit=1000)["data"]
        assert {h["id"] for h in hits} == expected


CRASHING_APPLY = textwrap.dedent("""
    import os, sys
    import redis
    from flowpool.blobs import RedisBlobs
    from flowpool.datastores import Datastores, replica
    from flowpool.settings import Settings

    real_apply = replica.Replica._apply

    class Dying:
        '''A connection that kills the process instead of committing (the vectors are written by then).'''
        def __init__(self, conn):
            self.conn = conn
        def execute(self, sql, *args):
            if sql == "COMMIT":
                os._exit(3)
            return self.conn.execute(sql, *args)
        def __getattr__(self, name):
            return getattr(self.conn, name)

    def apply(self, conn, seq, blob, batch):
        return real_apply(self, Dying(conn) if seq == 2 else conn, seq, blob, batch)

    replica.Replica._apply = apply
    client = redis.Redis(port=int(sys.argv[1]), db=15)
    engine = Datastores(client, RedisBlobs(client), Settings(cache_dir=sys.argv[2]))
    engine.get_record("acct-a", "docs", "r1")
""")


def test_a_replica_that_died_mid_apply_recovers_on_the_next_read(redis_server: RedisServer, redis_db: redis.Redis,
                                                                  tmp_path: Path) -> None:
    writer = host(redis_db, tmp_path / "writer")
    writer.create(ACCOUNT, SPEC)
    writer.ingest(ACCOUNT, "docs", [record(1), record(2)])
    writer.ingest(ACCOUNT, "docs", [record(2, "pear"), record(3, "pear")])

    died = subprocess.run([sys.executable, "-c", CRASHING_APPLY, str(redis_server.port), str(tmp_path / "reader")],
                          capture_output=True, timeout=60)

    assert died.returncode == 3, died.stderr.decode()
    [generation] = (tmp_path / "reader" / "datastores" / ACCOUNT / "docs").iterdir()
    directory = generation / replica.FORMAT
    assert (directory / "vectors.f32").stat().st_size == 4 * 2 * 4  # two rows past the committed two
    reader = host(redis_db, tmp_path / "reader")
    assert [h["id"] for h in reader.search(ACCOUNT, "docs", query="pear")["data"]] == ["r2", "r3"]
    assert [h["id"] for h in reader.search(ACCOUNT, "docs", vector=[1, 3], limit=5)["data"]] == ["r3", "r2", "r1"]
    assert reader.get_record(ACCOUNT, "docs", "r2")["vec"] == [1.0, 2.0]
    assert (directory / "vectors.f32").stat().st_size == 4 * 2 * 4  # the torn rows cut, the batch applied again


def test_a_new_host_starts_from_the_latest_snapshot_and_replays_only_what_follows(
        redis_db: redis.Redis, tmp_path: Path) -> None:
    a = host(redis_db, tmp_path / "a", datastore_snapshot_batches=2)
    a.create(ACCOUNT, SPEC)
    for i in range(5):
        a.ingest(ACCOUNT, "docs", [record(i)])
        a.snapshots.wait(30)
    a.delete_records(ACCOUNT, "docs", ["r0"])  # batch 6: a snapshot at 6 replaces the one at 4
    a.snapshots.wait(30)
    a.ingest(ACCOUNT, "docs", [record(1, "pear")])
    manifest = a.manifests.read(ACCOUNT, "docs")
    batches = a.manifests.batches(ACCOUNT, "docs", manifest.generation, 0, manifest.head)
    blobs = RedisBlobs(redis_db)
    assert manifest.snapshot == 6
    assert blobs.exists(f"{manifest.prefix}snapshots/6/{replica.FORMAT}/replica.sqlite3")
    assert not blobs.exists(f"{manifest.prefix}snapshots/4/{replica.FORMAT}/replica.sqlite3")
    blobs.delete(*batches[:6])  # a host that replayed from the start could not read these any more

    b = host(redis_db, tmp_path / "b")

    assert b.get_record(ACCOUNT, "docs", "r0") is None
    assert b.get_record(ACCOUNT, "docs", "r1") == {"id": "r1", "text": "pear 1", "vec": [1.0, 1.0]}
    assert [h["id"] for h in b.search(ACCOUNT, "docs", query="apple", limit=10)["data"]] == ["r2", "r3", "r4"]
    assert [h["id"] for h in b.search(ACCOUNT, "docs", vector=[1, 4], limit=2)["data"]] == ["r4", "r3"]


def test_a_host_holding_a_replica_of_a_deleted_store_reads_the_new_one(redis_db: redis.Redis, tmp_path: Path) -> None:
    a, b = host(redis_db, tmp_path / "a"), host(redis_db, tmp_path / "b")
    a.create(ACCOUNT, SPEC)
    a.ingest(ACCOUNT, "docs", [record(1)])
    assert b.get_record(ACCOUNT, "docs", "r1") is not None

    a.delete(ACCOUNT, "docs")
    a.create(ACCOUNT, SPEC)
    a.ingest(ACCOUNT, "docs", [record(2)])

    assert b.get_record(ACCOUNT, "docs", "r1") is None
    assert [h["id"] for h in b.search(ACCOUNT, "docs", query="apple")["data"]] == ["r2"]
    assert len(list((tmp_path / "b" / "datastores" / ACCOUNT / "docs").iterdir())) == 1


def test_many_threads_read_while_a_writer_writes(redis_db: redis.Redis, tmp_path: Path) -> None:
    a = host(redis_db, tmp_path / "a")
    a.create(ACCOUNT, SPEC)
    a.ingest(ACCOUNT, "docs", [record(0)])
    reader = host(redis_db, tmp_path / "b")
    stop, errors = threading.Event(), []

    def read() -> None:
        try:
            while not stop.is_set():
                hits = reader.search(ACCOUNT, "docs", query="apple", limit=100)["data"]
                assert hits and hits[0]["record"]["text"].startswith("apple")
                assert reader.get_record(ACCOUNT, "docs", "r0") is not None
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for i in range(1, 30):
        a.ingest(ACCOUNT, "docs", [record(i)])
    stop.set()
    for thread in threads:
        thread.join(30)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert len(reader.search(ACCOUNT, "docs", query="apple", limit=100)["data"]) == 30
