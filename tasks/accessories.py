"""Accessories at run time: a worker's cache of them, by content hash, and the open file a run gets.

An accessory is a read-only JSON file bundled with a workflow version. The
version's meta names each one's blob (``accessory_objects``: blob name,
sha256, size); versions written before accessories moved to the blob store
keep the bytes in field ``accessory:<key>`` of the version's hash instead.

:meth:`AccessoryCache.open` resolves, for a run, in this order:

1. in the process: the version's accessory table (versions are immutable, so
   it is kept, keyed with the version's content hash so a workflow deleted
   and uploaded again never reads its predecessor's), and a SEALED copy of
   each accessory this process has served (:class:`~flowpool.tasks.sealed.SealedCopies`): a memfd
   whose bytes were hashed as they were copied in, then sealed against
   writing, growing and shrinking, so nobody (whatever its uid, mode changes
   or capabilities) can change them afterwards;
2. the host's disk cache, ``<cache_path>/accessories/<sha256>``, shared by
   every worker process on the host (directories 0700, files 0400). It is
   read, and hashed, only when a process makes its sealed copy: a file
   changed on disk is never served, it is fetched again;
3. the blob store. One process or thread per hash fetches (``flock`` on a
   lock file beside it, so the others wait and then find the file), into a
   temporary file hashed as it is written and renamed into place only if
   its sha256 matches: a partial or corrupted download is never served, and
   one still running at the run's deadline gives up and leaves no file.

A 50 MB accessory is thus fetched once per host, copied into memory once per
worker process (one copy per distinct accessory, in shared memory, bounded
by FLOWPOOL_ACCESSORY_MEMORY_MB), and each run that loads it gets a new
read-only open file description of that copy with the call's reply
(:class:`flowpool.sandbox.WithFile`, passed with SCM_RIGHTS): it reads the
bytes itself, from its own offset, and only its own version's accessory
(docs/sandbox.md, "How an accessory reaches a run").
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

import redis

from flowpool import keys
from flowpool.blobs import BlobNotFound, BlobStore, open_blob_store
from flowpool.run import RunJob
from flowpool.sandbox import CallErrorKind, CallFailed, WithFile
from flowpool.settings import Settings

from .sealed import SealedCopies, host_support_missing, sealed_copy

__all__ = ["AccessoryAllowance", "AccessoryCache"]

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
    """A worker's accessories: each version's table and a sealed copy of each accessory in memory, the files on
    the host's disk, the blob store behind.

    Memory: one copy of each distinct accessory a worker process serves, in
    shared memory, within FLOWPOOL_ACCESSORY_MEMORY_MB (:class:`~flowpool.tasks.sealed.SealedCopies`).
    Thread-safe: a worker serves many runs on threads.
    """

    def __init__(self, client: redis.Redis, settings: Settings, blobs: BlobStore | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.directory = os.path.join(settings.cache_path, "accessories")
        self._blobs = blobs
        self._lock = threading.Lock()
        self._versions: OrderedDict[tuple[str, str, str, str], dict[str, _Entry]] = OrderedDict()
        self._copies = SealedCopies(int(settings.accessory_memory_mb * (1 << 20)))
        self._swept = False  # whether this process has removed the temporary files dead fetches left

    @property
    def blobs(self) -> BlobStore:
        """The blob store, opened on first use (an S3 client is made only when a run needs one)."""
        if self._blobs is None:
            self._blobs = open_blob_store(self.settings, self.redis)
        return self._blobs

    def open(self, job: RunJob, key: Any, deadline: float, allowance: AccessoryAllowance | None = None) -> WithFile:
        """Accessory ``key`` of the job's version as an open read-only file, with its key, size and hash.

        CallFailed ``not_found`` for a key the version has not (the message
        lists those it has), ``unavailable`` when its bytes cannot be had
        (the cause, which may name host paths or the blob store, goes to the
        worker's log only) or would take the run past its ``allowance``,
        ``timeout`` when the run's time runs out first.
        """
        if not isinstance(key, str) or not key:
            raise CallFailed(CallErrorKind.INVALID, f"ctx.load_accessory needs an accessory key, got {key!r}")
        missing = host_support_missing()
        if missing:
            raise CallFailed(CallErrorKind.UNAVAILABLE, f"this worker cannot serve accessories: {missing}")
        where = f"accessory {key[:80]!r} of {job.workflow}@{job.version}"
        try:
            return self._open(job, key, deadline, where, allowance)
        except (OSError, redis.RedisError) as exc:  # the disk (no space, descriptors, permissions) or Redis
            log.warning("could not open %s: %s", where, exc)
            raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} could not be read on this worker") from exc

    def _open(self, job: RunJob, key: str, deadline: float, where: str,
              allowance: AccessoryAllowance | None) -> WithFile:
        table = self._table(job)
        entry = table.get(key)
        if entry is None:
            has = ", ".join(sorted(table)) or "none"
            raise CallFailed(CallErrorKind.NOT_FOUND, f"workflow {job.workflow}@{job.version} has no accessory "
                             f"{key!r}; its accessories: {has}")
        fetch: Callable[[_Hashing, float], None]
        if entry.blob is None:  # a version from before the blob store: the bytes are in the version's hash
            def fetch(out: _Hashing, deadline: float) -> None:
                out.write(self._legacy_bytes(job, key, where))

            if entry.sha256 is None:  # read them once to learn their hash
                data = self._legacy_bytes(job, key, where)
                entry.sha256, entry.size = hashlib.sha256(data).hexdigest(), len(data)
        else:
            blob = entry.blob

            def fetch(out: _Hashing, deadline: float) -> None:
                self._download(blob, out, deadline, where)
        assert entry.sha256 is not None and entry.size is not None
        if allowance is None:
            fd = self._open_cached(entry.sha256, fetch, deadline, where)
        else:
            with allowance.taking(entry.size, where):
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

    # The sealed copy in memory, then the host's disk cache

    def _open_cached(self, sha256: str, fetch: Callable[[_Hashing, float], None], deadline: float,
                     where: str) -> int:
        """A new read-only open file description of this process's sealed copy of ``sha256``, made first
        (from the disk cache, fetched into it first if the host has none) if the process has none.

        One thread per hash makes the copy; the others wait for it (until
        their run's deadline) and are then served from it.
        """
        if not all(c in "0123456789abcdef" for c in sha256) or len(sha256) != 64:
            raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} has no valid content hash")
        fd = self._copies.reopen(sha256)
        if fd is not None:
            return fd
        with self._copies.making(sha256, deadline, where):
            fd = self._copies.reopen(sha256)  # made while this thread waited
            if fd is None:
                fd = self._copies.keep(sha256, self._copy_from_disk(sha256, fetch, deadline, where))
            return fd

    def _copy_from_disk(self, sha256: str, fetch: Callable[[_Hashing, float], None], deadline: float,
                        where: str) -> int:
        """A sealed memfd holding the disk cache's file of ``sha256``, fetched (again) if the host has no
        file whose bytes hash to it."""
        path = os.path.join(self.directory, sha256)
        self._make_directory()
        memfd = sealed_copy(path, sha256)
        if memfd is None:
            with self._locked(sha256, deadline, where):
                memfd = sealed_copy(path, sha256)  # fetched by another process or thread meanwhile
                if memfd is None:
                    self._fetch(sha256, path, fetch, deadline, where)
                    memfd = sealed_copy(path, sha256)
        if memfd is None:
            raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} changed on this worker's disk as it was "
                             "written")
        return memfd

    def _make_directory(self) -> None:
        """Make the cache's directories (0700), refusing ones another user owns or others may write in:
        a cache directory under ``/tmp`` could have been made first by another local user. The first
        time in a process, ``.part`` files that no fetch is writing are removed."""
        root = self.settings.cache_path
        os.makedirs(self.directory, mode=0o700, exist_ok=True)  # the cache's root too, when it is new
        for directory, own in ((root, False), (self.directory, True)):
            info = os.lstat(directory)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or \
                    (info.st_mode & 0o022 and not own):
                raise PermissionError(errno.EPERM, "a cache directory must be a directory of this worker's user "
                                      "that no other user may write in", directory)
            if own and info.st_mode & 0o077:  # made earlier with a wider umask, or by hand
                os.chmod(directory, 0o700)
        if not self._swept:
            self._swept = True
            self._sweep_parts()

    def _sweep_parts(self) -> None:
        """Remove the temporary files of fetches that died (a killed worker): only those of a hash whose
        lock nobody holds, so a fetch under way in another process keeps its file."""
        for name in os.listdir(self.directory):
            if not (name.startswith(".") and name.endswith(".part")):
                continue
            sha256 = name[1:].split(".", 1)[0]
            try:
                with _FileLock(os.path.join(self.directory, f".{sha256}.lock"), time.monotonic(), name):
                    os.unlink(os.path.join(self.directory, name))
            except (CallFailed, OSError):
                pass  # being fetched now, or gone already

    def _locked(self, sha256: str, deadline: float, where: str) -> _FileLock:
        return _FileLock(os.path.join(self.directory, f".{sha256}.lock"), deadline, where)

    def _fetch(self, sha256: str, path: str, fetch: Callable[[_Hashing, float], None], deadline: float,
               where: str) -> None:
        """Fetch into a temporary file beside ``path``, hashing as it is written, check the hash, rename it
        into place. A fetch that fails or runs past the run's deadline leaves no file: the next run (or a
        waiting one) tries again."""
        tmp = os.path.join(self.directory, f".{sha256}.{uuid.uuid4().hex}.part")
        try:
            with open(tmp, "wb") as file:
                out = _Hashing(file)
                try:
                    fetch(out, deadline)
                except CallFailed:
                    raise
                except TimeoutError as exc:
                    raise CallFailed(CallErrorKind.TIMEOUT, f"{where}: the run's time ran out while it was "
                                     "fetched") from exc
                except Exception as exc:  # the blob store's own errors: Redis, S3, the disk
                    log.warning("could not fetch %s: %s", where, exc)
                    raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} could not be fetched") from exc
            if out.digest.hexdigest() != sha256:
                raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} is corrupted in the blob store: its bytes do "
                                 "not match its sha256")
            os.chmod(tmp, 0o400)
            os.replace(tmp, path)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _download(self, blob: str, out: _Hashing, deadline: float, where: str) -> None:
        """Fetch ``blob`` from the blob store into ``out``, counted in the metrics (``accessory_fetches``)."""
        try:
            size = self.blobs.write_to(blob, out, deadline)  # type: ignore[arg-type]
        except BlobNotFound as exc:
            log.warning("%s: blob %r is missing from the blob store (%s)", where, blob, self.blobs.location)
            raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where}: its blob is missing from the blob store") from exc
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(keys.METRICS, "accessory_fetches", 1)
            pipe.hincrby(keys.METRICS, "accessory_fetch_bytes", size)
            pipe.execute()
        except redis.RedisError:
            pass  # a counter is not worth failing the run for


class AccessoryAllowance:
    """The accessory bytes one run may still be handed: at most its memory limit (0: no limit).

    Each copy handed to a run stays in memory while the run holds it, even
    after the worker has let go of it (memory charged to the worker, outside
    FLOWPOOL_ACCESSORY_MEMORY_MB), and a run must read what it loads into its
    own memory anyway: so a run that asks for more than its memory limit in
    all (ctx.load_accessory caches per key; a script calling the transport
    itself could ask again and again) is refused with a clear error. What it
    holds is freed when its process ends, within its hard time limit.
    """

    def __init__(self, memory_bytes: int) -> None:
        self.limit, self.handed = memory_bytes, 0
        self._lock = threading.Lock()

    @contextmanager
    def taking(self, size: int, where: str) -> Iterator[None]:
        """Counts ``size`` bytes handed to the run if the block succeeds; CallFailed if they do not fit."""
        with self._lock:
            if self.limit and self.handed + size > self.limit:
                raise CallFailed(CallErrorKind.UNAVAILABLE, f"{where} ({size / (1 << 20):.1f} MB) would take the "
                                 f"accessories handed to this run to {(self.handed + size) / (1 << 20):.1f} MB, "
                                 f"over its memory limit of {self.limit / (1 << 20):.0f} MB")
            self.handed += size
        try:
            yield
        except BaseException:
            with self._lock:
                self.handed -= size
            raise


class _Hashing:
    """A file being written, and the sha256 of what was written to it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)


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
