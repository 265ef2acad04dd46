"""The Linux calls the sandbox makes that :mod:`os` lacks (prctl, mount, unshare, setns, capset), through ctypes,
and :func:`readable`, a readiness check that works for any file descriptor number."""
from __future__ import annotations

import ctypes
import os
import select

__all__ = ["CLONE_NEWIPC", "CLONE_NEWNET", "CLONE_NEWNS", "CLONE_NEWPID", "MS_BIND", "MS_NODEV", "MS_NOEXEC",
           "MS_NOSUID", "MS_PRIVATE", "MS_RDONLY", "MS_REC", "MS_REMOUNT", "PR_CAPBSET_DROP",
           "PR_SET_CHILD_SUBREAPER", "PR_SET_NO_NEW_PRIVS", "check", "libc", "mount", "prctl", "readable"]

PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    """Raise OSError, saying ``what`` failed, when a libc call returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, arg: int) -> None:
    """``prctl(option, arg)``, its result unchecked."""
    libc.prctl(option, arg, 0, 0, 0)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """``mount(2)``; OSError when it fails."""
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), f"mount {target}")


def readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether ``fd`` (a pidfd, a pipe, a socket) is readable within ``timeout`` seconds.

    poll, not select: a worker holding hundreds of run slots (each with its
    cgroup files, pidfd and channel open) has descriptors past select's 1024.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))
