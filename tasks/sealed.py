"""A worker process's sealed in-memory copies of accessories (memfds), and what the host needs for them.

Split from :mod:`flowpool.tasks.accessories`, which finds, fetches and
hashes accessories; here is what keeps a copy that no run can change and
hands each run its own open file description of it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from flowpool.sandbox import CallErrorKind, CallFailed

__all__ = ["SealedCopies", "host_support_missing", "open_if", "sealed_copy"]

log = logging.getLogger("flowpool.worker")

# The seals of a copy in memory: its bytes and size can no longer change, nor its seals.
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_CHUNK = 1 << 20
# Where a process reopens its own descriptors: a new open file description of a memfd for each run.
_PROC_FD = "/proc/self/fd"


class SealedCopies:
    """This process's sealed in-memory copies of accessories (memfds), by sha256, least recently used first.

    The issue's "in process" tier: one copy per distinct accessory per
    worker process, in shared memory (shmem, counted against the worker's
    memory), so that a run is never handed the disk cache's file: a run
    sharing the worker's uid owns that file and could make it writable. A
    sealed memfd cannot be written, truncated or grown by anyone, whatever
    its mode or owner, so the bytes a run reads are the bytes that were
    hashed. Each serve is a new open file description (opened through
    ``/proc/self/fd``): runs reading at once never share a file offset.

    The copies are kept within ``budget`` bytes per worker process
    (FLOWPOOL_ACCESSORY_MEMORY_MB; the newest is kept even alone over it):
    the least recently served is let go first. Letting one go closes the
    process's descriptor only; those already handed to runs stay valid, and
    its memory is freed when the last of them is closed: a copy a run holds
    lives until the run ends (within its hard limit), outside the budget,
    which is why a run is handed at most its memory limit in accessories
    (:class:`~flowpool.tasks.accessories.AccessoryAllowance`). Thread-safe.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._copies: OrderedDict[str, tuple[int, int]] = OrderedDict()  # sha256 -> (memfd, size)
        self._bytes = 0
        self._making: dict[str, list[Any]] = {}  # sha256 -> [its lock, threads using it]

    def reopen(self, sha256: str) -> int | None:
        """A new read-only description of the copy of ``sha256``; None if this process has none (or let it go)."""
        with self._lock:  # under the lock: a copy let go of meanwhile would leave its descriptor number free
            held = self._copies.get(sha256)
            if held is None:
                return None
            fd = _reopen(held[0])
            self._copies.move_to_end(sha256)
            return fd

    def keep(self, sha256: str, memfd: int) -> int:
        """Keep the sealed ``memfd`` as the copy of ``sha256``, letting go of the least recently used past
        the budget; a new read-only description of it."""
        with self._lock:
            if sha256 in self._copies:
                self._drop(sha256)
            size = os.fstat(memfd).st_size
            self._copies[sha256] = (memfd, size)
            self._bytes += size
            while self._bytes > self.budget and len(self._copies) > 1:
                self._drop(next(iter(self._copies)))
            return _reopen(memfd)

    def _drop(self, sha256: str) -> None:
        memfd, size = self._copies.pop(sha256)
        self._bytes -= size
        os.close(memfd)

    @contextmanager
    def making(self, sha256: str, deadline: float, where: str) -> Iterator[None]:
        """Held by the one thread of this process making the copy of ``sha256``; others wait until ``deadline``."""
        with self._lock:
            slot = self._making.setdefault(sha256, [threading.Lock(), 0])
            slot[1] += 1
        try:
            if not slot[0].acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise CallFailed(CallErrorKind.TIMEOUT, f"{where}: still being read when the run's time ran out")
            try:
                yield
            finally:
                slot[0].release()
        finally:
            with self._lock:
                slot[1] -= 1
                if not slot[1]:
                    del self._making[sha256]


def _reopen(memfd: int) -> int:
    """A new read-only open file description of the sealed ``memfd``. A run sharing the worker's uid owns the
    copy and may have taken away its read mode (fchmod 000): its mode is put back, which is all such a run can
    change of it (its bytes, size and seals are sealed), so the copy is kept rather than made again."""
    try:
        return os.open(f"{_PROC_FD}/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        os.fchmod(memfd, 0o444)
        return os.open(f"{_PROC_FD}/{memfd}", os.O_RDONLY | os.O_CLOEXEC)


_host_missing: list[str | None] = []  # the answer of host_support_missing, once known


def host_support_missing() -> str | None:
    """What this host lacks to serve accessories, or None: ``memfd_create`` with sealing (the sealed copies;
    Linux 3.17+, allowed by any seccomp filter the worker runs under) and a mounted ``/proc`` (each run's own
    description of a copy is opened through ``/proc/self/fd``). Found out once per process; logged then."""
    if not _host_missing:
        missing = None
        try:
            memfd = os.memfd_create("flowpool-check", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError) as exc:
            missing = f"memfd_create with sealing is not available to it ({exc})"
        else:
            try:
                os.close(os.open(f"{_PROC_FD}/{memfd}", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                missing = f"/proc is not mounted or not readable in its namespace ({exc})"
            finally:
                os.close(memfd)
        if missing:
            log.error("accessories cannot be served: %s", missing)
        _host_missing.append(missing)
    return _host_missing[0]


def sealed_copy(path: str, sha256: str) -> int | None:
    """The disk cache's file at ``path`` copied into a new memfd, hashed as it is copied, then sealed; None
    if it is missing, not this worker's read-only regular file, or its bytes do not hash to ``sha256``."""
    src = open_if(path, lambda st: stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                   and stat.S_IMODE(st.st_mode) == 0o400)
    if src is None:
        return None
    memfd = -1
    try:
        memfd = os.memfd_create(f"flowpool-accessory-{sha256[:16]}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        digest = hashlib.sha256()
        offset = 0
        while chunk := os.pread(src, _CHUNK, offset):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(memfd, view):]
            offset += len(chunk)
        if digest.hexdigest() != sha256:
            return None
        os.fchmod(memfd, 0o444)  # readable, through /proc/self/fd, by the run it is handed to; writable by none
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        memfd, sealed = -1, memfd
        return sealed
    finally:
        os.close(src)
        if memfd >= 0:
            os.close(memfd)


def open_if(path: str, fits: Callable[[os.stat_result], bool]) -> int | None:
    """``path`` opened read-only (not through a symlink) if ``fstat`` of the open file ``fits``; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, PermissionError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink where the file should be
            return None
        raise
    try:
        if fits(os.fstat(fd)):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None
