"""The Linux calls the sandbox makes that :mod:`os` lacks (prctl, mount, unshare, setns, capset), through ctypes;
:func:`readable`, a readiness check that works for any file descriptor number; and the reading and killing of
other processes by pid (:func:`stat_fields`, :func:`kill_if`)."""
from __future__ import annotations

import ctypes
import os
import select
import signal
from typing import Callable

__all__ = ["CLONE_NEWIPC", "CLONE_NEWNET", "CLONE_NEWNS", "CLONE_NEWPID", "MS_BIND", "MS_NODEV", "MS_NOEXEC",
           "MS_NOSUID", "MS_PRIVATE", "MS_RDONLY", "MS_REC", "MS_REMOUNT", "PR_CAPBSET_DROP",
           "PR_SET_CHILD_SUBREAPER", "PR_SET_NO_NEW_PRIVS", "check", "kill_if", "libc", "mount", "prctl", "readable",
           "stat_fields"]

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


def children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (a thread other than the main one may fork), from /proc.

    A thread that ended meanwhile is passed over (its children went to
    another); OSError when the process itself is gone.
    """
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
        except OSError:  # gone (FileNotFoundError), or going (ProcessLookupError)
            continue
    return found


def stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name: the state (field 3 in proc(5)) is ``[0]``.

    The command name, in parentheses, may itself hold spaces, parentheses and
    bytes that are not UTF-8: the fields start after the last ``)``, and only
    they are decoded. OSError when the process is gone.
    """
    with open(f"/proc/{pid}/stat", "rb") as handle:
        return handle.read().rsplit(b")", 1)[1].decode().split()


def kill_if(pid: int, still_it: Callable[[], bool]) -> None:
    """SIGKILL ``pid`` if ``still_it()`` says it is still the process meant, not a new one that took its pid.

    The pidfd is opened before the check, so the signal goes to the process
    checked or to none (one that exited meanwhile). A check that fails to
    read the process (OSError, or IndexError on a short read) counts as no.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # gone already
    try:
        if still_it():
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, IndexError):
        pass
    finally:
        os.close(pidfd)
