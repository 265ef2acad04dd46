"""Accessories at run time: a worker's cache of them, by content hash, and the open file a run gets.

An accessory is a read-only JSON file bundled with a workflow version. The
version's meta names each one's blob (``accessory_objects``: blob name,
sha256, size); versions written before accessories moved to the blob store
keep the bytes in field ``accessory:<key>`` of the version's hash instead.

:meth:`AccessoryCache.open` resolves, for a run, in this order:

1. in the process: the version's accessory table (versions are immutable, so
   it is kept, keyed with the version's content hash so a workflow deleted
   and uploaded again never reads its predecessor's), and which hashes are
   already verified on disk;
2. the host's disk cache, ``<cache_path>/accessories/<sha256>``, shared by
   every worker process on the host (directories 0700, files 0400);
3. the blob store. One process or thread per hash fetches (``flock`` on a
   lock file beside it, so the others wait and then find the file), into a
   temporary file whose sha256 is checked before it is renamed into place:
   a partial or corrupted download is never served. A file found on disk is
   hashed once per process before it is first served.

A 50 MB accessory is thus fetched once per host, then opened from disk by
each run that loads it. The run gets the open read-only descriptor with the
call's reply (:class:`flowpool.sandbox.WithFile`, passed with SCM_RIGHTS):
it reads the file itself, and only the file of its own version's accessory.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import redis

from flowpool import keys
from flowpool.blobs import BlobStore, open_blob_store
from flowpool.run import RunJob
from flowpool.sandbox import CallErrorKind, CallFailed, WithFile
from flowpool.settings import Settings

__all__ = ["AccessoryCache"]

log = logging.getLogger("flowpool.worker")

# How many versions' accessory tables a worker keeps in memory (each is a few names and hashes).
_VERSIONS_KEPT = 4096
# How often a run waiting on another's fetch of the same file looks again.
_LOCK_POLL_SECONDS = 0.02


@dataclass
class _Entry:
    """One accessory of a version: where its bytes are, and their hash once known."""

    sha256: str | None  # None: a version from before the blob store, not read yet
    size: int | None = None
    blob: str | None = None  # its blob name; None: the bytes are in the version's hash (field accessory:<key>)


class AccessoryCache:
    """A worker's accessories: each version's table in memory, the files on the host's disk, the blob store behind.

    Thread-safe: a worker serves many runs on threads.
    """

    def __init__(self, client: redis.Redis, settings: Settings, blobs: BlobStore | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.directory = os.path.join(settings.cache_path, "accessories")
        self._blobs = blobs
        self._lock = threading.Lock()
        self._versions: OrderedDict[tuple[str, str, str, str], dict[str, _Entry]] = OrderedDict()
        self._verified: set[str] = set()  # hashes whose file this process has checked on disk

    @property
    def blobs(self) -> BlobStore:
        """The blob store, opened on first use (an S3 client is made only when a run needs one)."""
        if self._blobs is None:
            self._blobs = open_blob_store(self.settings, self.redis)
        return self._blobs

    def open(self, job: RunJob, key: Any, deadline: float) -> WithFile:
        """Accessory ``key`` of the job's version as an open read-only file, with its key, size and hash.

        CallFailed ``not_found`` for a key the version has not (the message
        lists those it has), ``unavailable`` when its bytes cannot be had.
        """
        if not isinstance(key, str) or not key:
            raise CallFailed(CallErrorKind.INVALID, f"ctx.load_accessory needs an accessory key, got {key!r}")
        table = self._table(job)
        entry = table.get(key)
        if entry is None:
            has = ", ".join(sorted(table)) or "none"
            raise CallFailed(CallErrorKind.NOT_FOUND, f"workflow {job.workflow}@{job.version} has no accessory "
                             f"{key!r}; its accessories: {has}")
        where = f"accessory {key!r} of {job.workflow}@{job.version}"
        fetch: Callable[[str], None]
        if entry.blob is None:  # a version from before the blob store: the bytes are in the version's hash
            def fetch(path: str) -> None:
                _write(path, self._legacy_bytes(job, key, where))

            if entry.sha256 is None:  # read them once to learn their hash
                data = self._legacy_bytes(job, key, where)
                entry.sha256, entry.size = hashlib.sha256(data).hexdigest(), len(data)
        else:
            blob = entry.blob

            def fetch(path: str) -> None:
                self._download(blob, path)
        assert entry.sha256 is not None
        fd = self._open_cached(entry.sha256, fetch, deadline, where)
        return WithFile({"key": key, "size": entry.size, "sha256": entry.sha256}, fd)

    def _legacy_bytes(self, job: RunJob, key: str, where: str) -> bytes:
        data = self.redis.hget(keys.version(job.account, job.workflow, job.version), f"accessory:{key}")
        if data is None:
            raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} is missing from its version")
        return data

    # The version's table

    def _table(self, job: RunJob) -> dict[str, _Entry]:
        ident = (job.account, job.workflow, job.version, job.content_hash)
        with self._lock:
            table = self._versions.get(ident)
            if table is not None:
                self._versions.move_to_end(ident)
                return table
        raw = self.redis.hget(keys.version(job.account, job.workflow, job.version), "meta")
        if raw is None:
            raise CallFailed(CallErrorKind.NOT_FOUND, f"workflow {job.workflow}@{job.version} no longer exists")
        meta = json.loads(raw)
        if meta.get("content_hash", job.content_hash) != job.content_hash:
            raise CallFailed(CallErrorKind.NOT_FOUND, f"workflow {job.workflow}@{job.version} was replaced since "
                             "this run started")
        objects = meta.get("accessory_objects")
        if isinstance(objects, dict):
            table = {str(k): _Entry(sha256=str(o["sha256"]), size=int(o["size"]), blob=str(o["object"]))
                     for k, o in objects.items()}
        else:
            table = {str(k): _Entry(sha256=None) for k in meta.get("accessories") or ()}
        with self._lock:
            self._versions[ident] = table
            while len(self._versions) > _VERSIONS_KEPT:
                self._versions.popitem(last=False)
        return table

    # The host's disk cache

    def _open_cached(self, sha256: str, fetch: Callable[[str], None], deadline: float, where: str) -> int:
        """An open read-only descriptor of the verified file of ``sha256``, fetched first if the host has none."""
        if not all(c in "0123456789abcdef" for c in sha256) or len(sha256) != 64:
            raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} has no valid content hash")
        path = os.path.join(self.directory, sha256)
        if sha256 in self._verified:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # the cache was cleared under us: fetch it again
                self._verified.discard(sha256)
        self._make_directory()
        with self._locked(sha256, deadline, where):
            if not _matches(path, sha256):
                self._fetch(sha256, path, fetch, where)
            self._verified.add(sha256)
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def _make_directory(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)  # the cache's root too, when it is new
        if os.stat(self.directory).st_mode & 0o077:  # made earlier with a wider umask, or by hand
            os.chmod(self.directory, 0o700)

    def _locked(self, sha256: str, deadline: float, where: str) -> _FileLock:
        return _FileLock(os.path.join(self.directory, f".{sha256}.lock"), deadline, where)

    def _fetch(self, sha256: str, path: str, fetch: Callable[[str], None], where: str) -> None:
        """Fetch into a temporary file beside ``path``, check its hash, rename it into place."""
        tmp = os.path.join(self.directory, f".{sha256}.{uuid.uuid4().hex}.part")
        try:
            try:
                fetch(tmp)
            except CallFailed:
                raise
            except Exception as exc:  # the blob store's own errors: Redis, S3, the disk
                log.warning("could not fetch %s: %s", where, exc)
                raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} could not be fetched: {exc}") from exc
            if not _matches(tmp, sha256):
                raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} is corrupted in the blob store: its bytes do "
                                 "not match its sha256")
            os.chmod(tmp, 0o400)
            os.replace(tmp, path)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _download(self, blob: str, path: str) -> None:
        """Fetch ``blob`` from the blob store to ``path``, counted in the metrics (``accessory_fetches``)."""
        from flowpool.blobs import BlobNotFound

        try:
            size = self.blobs.download(blob, path)
        except BlobNotFound as exc:
            raise CallFailed(CallErrorKind.UNAVAILABLE, f"blob {blob!r} is missing from the blob store "
                             f"({self.blobs.location})") from exc
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(keys.METRICS, "accessory_fetches", 1)
            pipe.hincrby(keys.METRICS, "accessory_fetch_bytes", size)
            pipe.execute()
        except redis.RedisError:
            pass  # a counter is not worth failing the run for


class _FileLock:
    """An exclusive ``flock`` on ``path``, waited for until ``deadline`` (monotonic): one fetch per hash per host.

    ``flock`` locks belong to the open file description, so two threads of
    one process exclude each other as two processes do.
    """

    def __init__(self, path: str, deadline: float, where: str) -> None:
        self.path, self.deadline, self.where = path, deadline, where
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(self.fd)
                    raise
            if time.monotonic() >= self.deadline:
                os.close(self.fd)
                raise CallFailed(CallErrorKind.TIMEOUT, f"{self.where}: still being fetched when the run's time "
                                 "ran out")
            time.sleep(_LOCK_POLL_SECONDS)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing the description releases the lock


def _matches(path: str, sha256: str) -> bool:
    """Whether the file at ``path`` exists and holds bytes of that hash."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return False
    return digest.hexdigest() == sha256


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
