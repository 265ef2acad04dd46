"""Reads given a deadline (a run's ctx.datastore calls): bringing the host's replica up to date stops there, keeps
what it applied, and says so; the next read goes on from there."""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import redis

from flowpool.blobs import RedisBlobs
from flowpool.datastores import Datastores, replica
from flowpool.errors import DatastoreCatchingUp
from flowpool.settings import Settings

ACCOUNT = "acct-a"
SPEC = {"name": "docs", "text_fields": ["text"], "vector_field": "vec", "vector_dims": 2}
# Far more than any wait below: a wait that ends at the deadline ends long before the host lock's own limit.
APPLY_WAIT = 60.0


class WatchedBlobs(RedisBlobs):
    """The Redis blob store, noting each batch read; ``after_read(name)`` runs once one is read (a slow link)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.read: list[str] = []
        self.after_read: Callable[[str], None] = lambda name: None

    def get(self, name: str) -> bytes:
        data = super().get(name)
        self.read.append(name)
        self.after_read(name)
        return data


def record(i: int) -> dict[str, Any]:
    return {"id": f"r{i}", "text": f"apple {i}", "vec": [1.0, float(i)]}


def hosts(client: redis.Redis, tmp_path: Path, **settings: Any) -> tuple[Datastores, Datastores, WatchedBlobs]:
    """A writer host and a reader host (its replica open, at the empty store's head) with watched blob reads."""
    writer = Datastores(client, RedisBlobs(client), Settings(cache_dir=str(tmp_path / "w"), **settings))
    blobs = WatchedBlobs(client)
    reader = Datastores(client, blobs, Settings(cache_dir=str(tmp_path / "r"), datastore_apply_wait_seconds=APPLY_WAIT))
    writer.create(ACCOUNT, SPEC)
    assert reader.get_record(ACCOUNT, "docs", "r1") is None
    return writer, reader, blobs


def replica_of(engine: Datastores) -> replica.Replica:
    return engine._replicas[(ACCOUNT, "docs")][0]


def applied_on_disk(engine: Datastores) -> int:
    """The batch the host's replica committed, read by a connection of its own."""
    with sqlite3.connect(replica_of(engine).db_path) as conn:
        return conn.execute("SELECT value FROM meta WHERE key = 'applied'").fetchone()[0]


class Clock:
    """The replica module's clock: the real one, moved on by ``jump`` seconds (a slow link, without waiting)."""

    def __init__(self) -> None:
        self.jump = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.jump

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


def test_a_catch_up_stops_at_the_deadline_between_batches_and_the_next_read_goes_on(
        redis_db: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, reader, blobs = hosts(redis_db, tmp_path)
    for i in (1, 2, 3):
        writer.ingest(ACCOUNT, "docs", [record(i)])
    clock = Clock()
    monkeypatch.setattr(replica, "time", clock)
    deadline = time.monotonic() + 600

    def slow_first(name: str) -> None:  # the first batch takes until past the deadline to arrive
        if len(blobs.read) == 1:
            clock.jump = 1200
    blobs.after_read = slow_first

    with pytest.raises(DatastoreCatchingUp) as raised:
        reader.get_record(ACCOUNT, "docs", "r3", deadline=deadline)

    assert "batch 1 of 3 applied" in raised.value.message
    assert len(blobs.read) == 1  # batches 2 and 3 were not even fetched
    assert applied_on_disk(reader) == 1 and replica_of(reader).state.applied == 1  # batch 1 stays applied
    blobs.after_read = lambda name: None
    assert reader.get_record(ACCOUNT, "docs", "r3")["text"] == "apple 3"  # no deadline: the rest
    assert reader.get_record(ACCOUNT, "docs", "r1")["text"] == "apple 1"
    assert len(blobs.read) == 3  # batch 1 was not fetched again
    assert applied_on_disk(reader) == 3


def test_a_host_lock_held_by_another_process_past_the_deadline_ends_the_wait_there(
        redis_db: redis.Redis, tmp_path: Path) -> None:
    writer, reader, _ = hosts(redis_db, tmp_path)
    writer.ingest(ACCOUNT, "docs", [record(1)])
    # Another process of the host applying (a flock on its own open file, as another process's would be).
    fd = os.open(replica_of(reader).dir / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(DatastoreCatchingUp):
            reader.search(ACCOUNT, "docs", query="apple", deadline=started + 0.2)
        assert time.monotonic() - started < APPLY_WAIT / 2  # the deadline ended it, not the lock's own limit
    finally:
        os.close(fd)
    assert [hit["id"] for hit in reader.search(ACCOUNT, "docs", query="apple")["data"]] == ["r1"]


def test_a_thread_applying_past_the_deadline_does_not_hold_up_another_past_it(
        redis_db: redis.Redis, tmp_path: Path) -> None:
    writer, reader, blobs = hosts(redis_db, tmp_path)
    writer.ingest(ACCOUNT, "docs", [record(1)])
    fetching, release = threading.Event(), threading.Event()

    def stuck(name: str) -> None:
        fetching.set()
        assert release.wait(30)
    blobs.after_read = stuck
    found: list[Any] = []
    applier = threading.Thread(target=lambda: found.append(reader.get_record(ACCOUNT, "docs", "r1")))  # no deadline
    applier.start()
    try:
        assert fetching.wait(30)
        started = time.monotonic()
        with pytest.raises(DatastoreCatchingUp):
            reader.get_record(ACCOUNT, "docs", "r1", deadline=started + 0.2)
        assert time.monotonic() - started < APPLY_WAIT / 2
    finally:
        release.set()
        applier.join(30)
    assert not applier.is_alive() and found[0]["text"] == "apple 1"


class GatedBlobs(RedisBlobs):
    """The Redis blob store whose downloads (a snapshot's files) wait for ``gate``: a slow link, opened at will."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.gate = threading.Event()
        self.downloads: list[str] = []

    def download(self, name: str, path: Any) -> int:
        self.downloads.append(name)
        assert self.gate.wait(30), "the test never opened the gate"
        return super().download(name, path)


def test_a_snapshot_download_outlasting_a_runs_deadline_goes_on_for_the_next_run(redis_db: redis.Redis,
                                                                                  tmp_path: Path) -> None:
    writer = Datastores(redis_db, RedisBlobs(redis_db),
                        Settings(cache_dir=str(tmp_path / "w"), datastore_snapshot_batches=1))
    writer.create(ACCOUNT, SPEC)
    writer.ingest(ACCOUNT, "docs", [record(1)])
    writer.snapshots.wait(30)
    assert writer.manifests.snapshot_seq(ACCOUNT, "docs") == 1
    blobs = GatedBlobs(redis_db)
    cold = Datastores(redis_db, blobs, Settings(cache_dir=str(tmp_path / "cold")))

    with pytest.raises(DatastoreCatchingUp):  # the first run's time runs out while the snapshot downloads
        cold.get_record(ACCOUNT, "docs", "r1", deadline=time.monotonic() + 0.2)
    with pytest.raises(DatastoreCatchingUp):  # and the next's: it waits on the same download, not a new one
        cold.get_record(ACCOUNT, "docs", "r1", deadline=time.monotonic() + 0.2)
    opening = [t for t in threading.enumerate() if t.name == "flowpool-datastore-open-docs"]
    assert len(opening) == 1 and len(cold._pending) == 1
    blobs.gate.set()

    assert cold.get_record(ACCOUNT, "docs", "r1", deadline=time.monotonic() + 30)["text"] == "apple 1"
    assert len(blobs.downloads) == 2  # the snapshot's two files, fetched once
    opening[0].join(30)
    assert not opening[0].is_alive() and cold._pending == {}


def test_an_open_for_a_store_deleted_meanwhile_is_not_kept(redis_db: redis.Redis, tmp_path: Path) -> None:
    writer = Datastores(redis_db, RedisBlobs(redis_db),
                        Settings(cache_dir=str(tmp_path / "w"), datastore_snapshot_batches=1))
    writer.create(ACCOUNT, SPEC)
    writer.ingest(ACCOUNT, "docs", [record(1)])
    writer.snapshots.wait(30)
    blobs = GatedBlobs(redis_db)
    cold = Datastores(redis_db, blobs, Settings(cache_dir=str(tmp_path / "cold")))
    with pytest.raises(DatastoreCatchingUp):  # a run gives up while the snapshot downloads
        cold.get_record(ACCOUNT, "docs", "r1", deadline=time.monotonic() + 0.2)
    opening = [t for t in threading.enumerate() if t.name == "flowpool-datastore-open-docs"]

    writer.delete(ACCOUNT, "docs")
    blobs.gate.set()
    opening[0].join(30)

    assert not opening[0].is_alive()
    assert cold._replicas == {} and cold._pending == {}
    assert not [p for p in (tmp_path / "cold").rglob("*") if p.suffix in (".sqlite3", ".f32")]
