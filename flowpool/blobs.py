"""The blob store: immutable named byte strings (accessories, datastore batches and snapshots).

Two backends behind one interface, chosen by ``FLOWPOOL_BLOB_URL``:

- unset: the registry's Redis (:class:`RedisBlobs`), so one command still
  runs everything. A blob is a list of chunks of at most ``CHUNK_BYTES``,
  written under a temporary key and renamed into place, so a reader sees
  the whole blob or none of it and no single command moves 50 MB.
- ``s3://bucket/prefix``: S3-compatible object storage (:class:`S3Blobs`),
  through boto3, with the endpoint from ``FLOWPOOL_BLOB_ENDPOINT_URL`` (or
  boto3's own ``AWS_ENDPOINT_URL``) and credentials from boto3's usual chain.

Names are relative paths (``accessories/<account>/<sha256>``); callers make
them content-addressed or versioned, so a blob is written once and never
changed in place.
"""
from __future__ import annotations

import os
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator
from urllib.parse import urlsplit

from . import keys
from .errors import Unavailable

if TYPE_CHECKING:
    import redis

    from .settings import Settings

__all__ = ["BlobNotFound", "BlobStore", "BlobStoreUnavailable", "RedisBlobs", "S3Blobs", "open_blob_store",
           "CHUNK_BYTES"]

CHUNK_BYTES = 1 << 20


class BlobNotFound(KeyError):
    """No blob of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no blob named {self.name!r}"


class BlobStoreUnavailable(Unavailable):
    """The blob store refused or failed a request (S3: access denied, no such bucket, unreachable): a 503 that
    names the store and its error code, never a bare 500."""


def _check_name(name: str, prefix: bool = False) -> str:
    """``name`` if it is a relative path without empty, ``.`` or ``..`` parts (a prefix may end in ``/``)."""
    parts = name.split("/")
    if prefix and len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]
    if not name or name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"not a blob name: {name!r}")
    return name


class BlobStore(ABC):
    """Named, immutable byte strings."""

    #: Where the blobs live, for people (no credentials).
    location: str

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, whole or not at all."""

    def put_file(self, name: str, path: str | Path) -> None:
        """Store a local file's bytes under ``name`` (backends stream it where they can)."""
        self.put(name, Path(path).read_bytes())

    def put_expiring(self, name: str, data: bytes, seconds: int) -> None:
        """Store ``data`` under ``name``, to lapse ``seconds`` from now where the store can expire a blob; one
        that cannot (S3) stores it as :meth:`put` does, and an operator's lifecycle rule removes it."""
        self.put(name, data)

    def expire(self, name: str, seconds: int) -> bool:
        """Make blob ``name`` lapse ``seconds`` from now where the store can (see :meth:`put_expiring`); whether it
        is stored."""
        return self.exists(name)

    @abstractmethod
    def get(self, name: str) -> bytes:
        """The bytes of blob ``name``; :class:`BlobNotFound` if there is none."""

    def download(self, name: str, path: str | Path) -> int:
        """Write blob ``name`` to ``path`` (through a temporary file beside it, renamed into place); its size."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            with open(tmp, "wb") as out:
                size = self.write_to(name, out)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def write_to(self, name: str, out: IO[bytes], deadline: float | None = None) -> int:
        """Write blob ``name`` into the open file ``out``, piece by piece; its size.

        ``deadline`` (monotonic): :class:`TimeoutError` once it has passed,
        looked at between pieces, for a caller that must not outlive a run's
        budget. What was written stays in ``out``: the caller removes it.
        """
        size = 0
        with closing(self._pieces(name)) as pieces:  # stopped early: the backend lets go of its stream now
            for piece in pieces:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"blob {name!r}: time ran out after {size} bytes")
                out.write(piece)
                size += len(piece)
        return size

    def _pieces(self, name: str) -> Iterator[bytes]:
        yield self.get(name)

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether blob ``name`` is stored."""

    @abstractmethod
    def delete(self, *names: str) -> None:
        """Remove these blobs; names not stored are no error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every blob whose name starts with ``prefix``; how many."""

    def check(self) -> None:
        """Raise unless the store answers with these settings and credentials (``flowpool doctor``)."""
        self.exists("flowpool-doctor-probe")


class RedisBlobs(BlobStore):
    """Blobs in the registry's Redis: one list of chunks per blob (see the module docstring)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        kwargs = client.connection_pool.connection_kwargs
        self.location = f"redis (db {kwargs.get('db', 0)} of the registry)"

    # A temporary key left by a writer that died mid-blob expires after this long.
    TMP_TTL_MS = 3600_000

    def put(self, name: str, data: bytes) -> None:
        view = memoryview(data)
        self._put_chunks(name, (view[i:i + CHUNK_BYTES] for i in range(0, len(view), CHUNK_BYTES)))

    def put_expiring(self, name: str, data: bytes, seconds: int) -> None:
        view = memoryview(data)
        self._put_chunks(name, (view[i:i + CHUNK_BYTES] for i in range(0, len(view), CHUNK_BYTES)), seconds)

    def expire(self, name: str, seconds: int) -> bool:
        return bool(self.redis.expire(keys.blob(_check_name(name)), seconds))

    def put_file(self, name: str, path: str | Path) -> None:
        with open(path, "rb") as source:
            self._put_chunks(name, iter(lambda: source.read(CHUNK_BYTES), b""))

    def _put_chunks(self, name: str, chunks: Iterator[bytes | memoryview], seconds: int | None = None) -> None:
        """Append the chunks to a temporary key, one a command (no single command moves the whole blob),
        then rename it into place (to lapse after ``seconds``, if given): readers see the whole blob or none of
        it."""
        key = keys.blob(_check_name(name))
        tmp = f"{key}:tmp:{uuid.uuid4().hex}"
        try:
            self.redis.rpush(tmp, next(chunks, b""))
            self.redis.pexpire(tmp, self.TMP_TTL_MS)
            for chunk in chunks:
                self.redis.rpush(tmp, chunk)
            with self.redis.pipeline() as pipe:  # the blob itself never expires, unless it was given a lifetime
                pipe.rename(tmp, key)
                if seconds is None:
                    pipe.persist(key)
                else:
                    pipe.expire(key, seconds)
                pipe.execute()
        finally:
            self.redis.delete(tmp)

    def get(self, name: str) -> bytes:
        return b"".join(self._pieces(name))

    def _pieces(self, name: str) -> Iterator[bytes]:
        key = keys.blob(_check_name(name))
        # Blobs are never changed in place, so the chunks read one at a time belong together;
        # a blob deleted meanwhile ends the read as not found.
        count = self.redis.llen(key)
        if not count:
            raise BlobNotFound(name)
        for index in range(count):
            piece = self.redis.lindex(key, index)
            if piece is None:
                raise BlobNotFound(name)
            yield piece

    def exists(self, name: str) -> bool:
        return bool(self.redis.exists(keys.blob(_check_name(name))))

    def delete(self, *names: str) -> None:
        if names:
            self.redis.delete(*(keys.blob(_check_name(n)) for n in names))

    def delete_prefix(self, prefix: str) -> int:
        removed = 0
        pattern = keys.blob(_check_name(prefix, prefix=True))
        for char in "\\*?[]":
            pattern = pattern.replace(char, "\\" + char)
        for key in self.redis.scan_iter(match=pattern + "*", count=500):
            removed += self.redis.delete(key)
        return removed


_MISSING = ("404", "NoSuchKey", "NotFound")  # S3's codes for an object that is not there


class S3Blobs(BlobStore):
    """Blobs in an S3-compatible bucket, under ``prefix``."""

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        import boto3  # the server extra; only this backend needs it
        from botocore.config import Config

        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"FLOWPOOL_BLOB_URL must look like s3://bucket/prefix, not {url!r}")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.location = f"s3://{self.bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        self.s3 = boto3.client("s3", endpoint_url=endpoint_url,
                               config=Config(retries={"mode": "standard", "max_attempts": 4},
                                             connect_timeout=5, read_timeout=60))

    def _key(self, name: str, prefix: bool = False) -> str:
        name = _check_name(name, prefix)
        return f"{self.prefix}/{name}" if self.prefix else name

    @contextmanager
    def _answers(self, what: str, name: str | None = None) -> Iterator[None]:
        """S3's errors as flowpool's: a missing object is :class:`BlobNotFound` (when ``name`` is given),
        anything else the service or the connection says is :class:`BlobStoreUnavailable` with its code."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "error"))
            if name is not None and code in _MISSING:
                raise BlobNotFound(name) from exc
            raise BlobStoreUnavailable(f"the blob store ({self.location}) refused to {what}: {code}",
                                       blob_store=self.location, store_error=code) from exc
        except (BotoCoreError, S3UploadFailedError) as exc:
            raise BlobStoreUnavailable(f"the blob store ({self.location}) could not {what}: {exc}",
                                       blob_store=self.location, store_error=type(exc).__name__) from exc

    def put(self, name: str, data: bytes) -> None:
        with self._answers(f"store {name!r}"):
            self.s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def put_file(self, name: str, path: str | Path) -> None:
        with self._answers(f"store {name!r}"):
            self.s3.upload_file(str(path), self.bucket, self._key(name))  # multipart for large files

    def get(self, name: str) -> bytes:
        with self._answers(f"read {name!r}", name):
            return self.s3.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

    def _pieces(self, name: str) -> Iterator[bytes]:
        with self._answers(f"read {name!r}", name):
            body = self.s3.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
            try:
                yield from body.iter_chunks(CHUNK_BYTES)
            finally:  # a reader that stops early (a deadline): the connection is closed now, not at GC
                body.close()

    def exists(self, name: str) -> bool:
        try:
            with self._answers(f"look up {name!r}", name):
                self.s3.head_object(Bucket=self.bucket, Key=self._key(name))
        except BlobNotFound:
            return False
        return True

    def check(self) -> None:
        # A HEAD of a missing object reads as "not found" even where the bucket is missing: ask about the bucket.
        with self._answers(f"reach bucket {self.bucket!r}"):
            self.s3.head_bucket(Bucket=self.bucket)

    def delete(self, *names: str) -> None:
        keys_ = [{"Key": self._key(n)} for n in names]
        for start in range(0, len(keys_), 1000):
            self._delete_objects(keys_[start:start + 1000])

    def delete_prefix(self, prefix: str) -> int:
        removed = 0
        with self._answers(f"list {prefix!r}"):
            paginator = self.s3.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix, prefix=True)):
                objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if objects:
                    self._delete_objects(objects)
                    removed += len(objects)
        return removed

    def _delete_objects(self, objects: list[dict[str, str]]) -> None:
        """One DeleteObjects request; the objects it could not delete (listed in its answer even when quiet)
        raise, so a blob left behind is never taken for gone."""
        with self._answers("delete blobs"):
            answer = self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        failed = answer.get("Errors") or []
        if failed:
            first = failed[0]
            raise BlobStoreUnavailable(f"the blob store ({self.location}) did not delete {len(failed)} of "
                                       f"{len(objects)} blobs: {first.get('Key')!r}: {first.get('Code')}",
                                       blob_store=self.location, store_error=str(first.get("Code")))


def open_blob_store(settings: Settings, client: redis.Redis) -> BlobStore:
    """The blob store the settings name: S3 for ``FLOWPOOL_BLOB_URL=s3://...``, else the registry's Redis."""
    if settings.blob_url:
        return S3Blobs(settings.blob_url, settings.blob_endpoint_url)
    return RedisBlobs(client)
