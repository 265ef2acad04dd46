"""The blob store, both backends behind one set of tests: the session's Redis, and S3 on a loopback moto server."""
from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from flowpool import keys
from flowpool.blobs import CHUNK_BYTES, BlobNotFound, BlobStore, RedisBlobs, S3Blobs, open_blob_store
from flowpool.settings import Settings

BIG = os.urandom(3 * CHUNK_BYTES + 12345)  # a little over 3 MB: four chunks in Redis


@pytest.fixture
def s3_env(s3_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The loopback S3 server, its credentials in this process's environment (boto3 reads them there)."""
    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(params=["redis", "s3"])
def blobs(request: pytest.FixtureRequest, redis_db: redis.Redis) -> Iterator[BlobStore]:
    """Each backend in turn; an S3 store under a prefix of its own, so tests never see each other's blobs."""
    if request.param == "redis":
        yield RedisBlobs(redis_db)
        return
    server = request.getfixturevalue("s3_env")
    yield S3Blobs(f"s3://{server['bucket']}/test-{uuid.uuid4().hex[:8]}", server["endpoint_url"])


def test_put_get_exists_delete(blobs: BlobStore) -> None:
    assert not blobs.exists("accessories/acct/one")
    blobs.put("accessories/acct/one", b'{"a": 1}')
    blobs.put("accessories/acct/empty", b"")

    assert blobs.exists("accessories/acct/one")
    assert blobs.get("accessories/acct/one") == b'{"a": 1}'
    assert blobs.get("accessories/acct/empty") == b""
    blobs.delete("accessories/acct/one", "accessories/acct/never-stored")
    assert not blobs.exists("accessories/acct/one")
    assert blobs.exists("accessories/acct/empty")
    with pytest.raises(BlobNotFound):
        blobs.get("accessories/acct/one")


def test_a_3_mb_blob_round_trips_through_get_download_and_put_file(blobs: BlobStore, tmp_path: Path) -> None:
    blobs.put("big/put", BIG)
    assert blobs.get("big/put") == BIG
    target = tmp_path / "down.bin"
    assert blobs.download("big/put", target) == len(BIG)
    assert target.read_bytes() == BIG
    assert [p.name for p in tmp_path.iterdir()] == ["down.bin"]  # no temporary file left beside it

    source = tmp_path / "source.bin"
    source.write_bytes(BIG[::-1])
    blobs.put_file("big/file", source)
    assert blobs.get("big/file") == BIG[::-1]


@pytest.mark.parametrize("how", ["put", "put_file"])
def test_redis_keeps_a_large_blob_as_chunks_without_expiry_and_no_temporary_key(
        redis_db: redis.Redis, tmp_path: Path, how: str) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(BIG)
    store = RedisBlobs(redis_db)
    store.put("big/chunked", BIG) if how == "put" else store.put_file("big/chunked", source)

    assert redis_db.llen(keys.blob("big/chunked")) == 4
    assert max(len(c) for c in redis_db.lrange(keys.blob("big/chunked"), 0, -1)) == CHUNK_BYTES
    assert redis_db.ttl(keys.blob("big/chunked")) == -1  # the temporary key's expiry did not come along
    assert [k for k in redis_db.scan_iter() if b":tmp:" in k] == []


def test_delete_prefix_removes_only_names_under_it(blobs: BlobStore) -> None:
    for name in ("store/a/1", "store/a/2", "store/ab/1", "store/b/1", "glob[1]/x", "glob1/x"):
        blobs.put(name, name.encode())

    assert blobs.delete_prefix("store/a/") == 2
    assert blobs.delete_prefix("glob[1]/") == 1  # a glob character is a plain character in a prefix
    assert [n for n in ("store/a/1", "store/a/2", "store/ab/1", "store/b/1", "glob[1]/x", "glob1/x")
            if blobs.exists(n)] == ["store/ab/1", "store/b/1", "glob1/x"]
    assert blobs.delete_prefix("nothing/here/") == 0


@pytest.mark.parametrize("name", ["", "/etc/passwd", "../outside", "a/../../b", "a//b", "./a", "a/."])
def test_names_that_are_not_relative_paths_are_refused(blobs: BlobStore, name: str, tmp_path: Path) -> None:
    for call in (lambda: blobs.put(name, b"{}"), lambda: blobs.get(name), lambda: blobs.exists(name),
                 lambda: blobs.delete(name), lambda: blobs.download(name, tmp_path / "x"),
                 lambda: blobs.delete_prefix(name)):
        with pytest.raises(ValueError, match="not a blob name"):
            call()


def test_a_missing_blob_raises_blob_not_found_and_downloads_nothing(blobs: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(BlobNotFound) as raised:
        blobs.get("accessories/acct/missing")
    assert raised.value.name == "accessories/acct/missing"
    assert "accessories/acct/missing" in str(raised.value)
    with pytest.raises(BlobNotFound):
        blobs.download("accessories/acct/missing", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_reader_never_sees_a_half_written_redis_blob(redis_db: redis.Redis) -> None:
    data = os.urandom(16 * CHUNK_BYTES)
    writer_store, reader_store = RedisBlobs(redis_db), RedisBlobs(redis.Redis(port=redis_db.connection_pool
                                                                               .connection_kwargs["port"], db=15))
    seen: list[int] = []
    misses = 0
    writer = threading.Thread(target=writer_store.put, args=("race/blob", data))
    writer.start()
    try:
        while True:  # bounded: the writer finishes, and then the blob is found
            try:
                got = reader_store.get("race/blob")
            except BlobNotFound:
                misses += 1
                assert writer.is_alive() or reader_store.exists("race/blob"), "the blob never appeared"
                continue
            seen.append(len(got))
            assert got == data, f"read {len(got)} of {len(data)} bytes: a half-written blob"
            break
    finally:
        writer.join(30)
        reader_store.redis.close()
    assert seen == [len(data)]


def test_open_blob_store_follows_the_settings(redis_db: redis.Redis, s3_env: dict[str, Any]) -> None:
    assert isinstance(open_blob_store(Settings(), redis_db), RedisBlobs)
    store = open_blob_store(Settings(blob_url=f"s3://{s3_env['bucket']}/via-settings",
                                     blob_endpoint_url=s3_env["endpoint_url"]), redis_db)
    assert isinstance(store, S3Blobs)
    store.put("x", b"1")
    assert store.s3.get_object(Bucket=s3_env["bucket"], Key="via-settings/x")["Body"].read() == b"1"
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        open_blob_store(Settings(blob_url="http://not-s3/x"), redis_db)


def test_an_s3_store_that_refuses_is_a_503_naming_the_store_and_its_error(s3_env: dict[str, Any],
                                                                          redis_db: redis.Redis,
                                                                          tmp_path: Path) -> None:
    """A bucket that is not there (or access denied): never a bare 500, and an upload stores nothing."""
    from flowpool.blobs import BlobStoreUnavailable
    from flowpool.registry.workflows import Upload, Workflows

    store = S3Blobs(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/p", s3_env["endpoint_url"])
    for attempt in (lambda: store.put("a/b", b"1"), lambda: store.get("a/b"), lambda: store.delete("a/b"),
                    lambda: store.download("a/b", tmp_path / "never-written")):
        with pytest.raises(BlobStoreUnavailable) as refused:
            attempt()
        body = refused.value.to_body()["error"]
        assert body["code"] == 503 and body["type"] == "service_unavailable"
        assert store.location in body["message"] and body["store_error"] == "NoSuchBucket"

    workflows = Workflows(redis_db, blobs=store)
    with pytest.raises(BlobStoreUnavailable, match="NoSuchBucket"):
        workflows.upload("acct", Upload(ref="w", script="def execute(ctx):\n    return 1\n",
                                        accessories={"a": b"{}"}))
    assert redis_db.keys("*w*") == []  # no version names a blob that was never stored


class _SlowFile:
    """A file whose first write takes until ``deadline`` has passed: a fetch that runs out of time mid-blob."""

    def __init__(self, deadline: float) -> None:
        self.deadline, self.written = deadline, 0

    def write(self, data: bytes) -> int:
        import time

        if not self.written:
            time.sleep(max(0.0, self.deadline - time.monotonic()) + 0.01)
        self.written += len(data)
        return len(data)


def test_write_to_stops_at_its_deadline_between_pieces(blobs: BlobStore, tmp_path: Path) -> None:
    """The deadline runs out while the first piece is written: the rest is never read (BIG is four pieces)."""
    import time

    blobs.put("big/deadline", BIG)
    out = _SlowFile(time.monotonic() + 0.2)
    with pytest.raises(TimeoutError):
        blobs.write_to("big/deadline", out, out.deadline)  # type: ignore[arg-type]
    assert 0 < out.written < len(BIG)
    with open(tmp_path / "out", "wb") as file:
        assert blobs.write_to("big/deadline", file, time.monotonic() + 60) == len(BIG)

