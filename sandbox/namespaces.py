"""Namespaces and mounts: the zygote's own isolation, and the PID, mount and IPC namespaces of each run.

The zygote calls :func:`isolate_zygote` and :func:`hide` once, where it is
privileged, and forks every run through a :class:`Forker`. A run's first
process enters its namespaces (:func:`enter_run_namespaces`, ahead of the
job when it is a spare), then :func:`own_namespaces` mounts its private
``/tmp`` and forks the run beneath it, staying behind as its init.
Imported by the zygote before it covers flowpool's code: nothing here may
import lazily.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
from typing import Callable

from flowpool.procs import set_parent_death_signal

from .linux import (CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID,
                    MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT, PR_CAPBSET_DROP, check, libc, mount, readable,
                    stat_fields)

__all__ = ["SHARED_WRITABLE", "Forker", "blank_command_line", "blocked_ancestor", "check_run_namespaces",
           "drop_capabilities",
           "enter_run_namespaces", "fails_in_a_child", "hide", "isolate_zygote", "own_namespaces"]

# Directories every uid may write to on a usual host: what a run leaves there outlives it
# unless the run has them in a mount namespace of its own, or they are swept by uid.
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def blank_command_line(words: tuple[str, ...] = ("python3", "-I", "-m", "flowpool.sandbox.zygote")) -> None:
    """Overwrite this process's command line, as ``/proc/<pid>/cmdline`` shows it, with ``words``.

    The zygote's real command line holds host paths (the interpreter's, the
    runtime's in its config) and every run is forked from it, so a script
    would read them in ``/proc/1/cmdline``. The kernel reads that file from
    the argument area of the process's own memory: writing over it (as
    setproctitle does) changes what every later fork shows, and costs a run
    nothing. Python keeps its own copy of argv, so ``sys.argv`` is untouched.
    """
    fields = stat_fields("self")
    # proc(5): arg_start and arg_end are fields 48 and 49; ``fields`` starts at field 3.
    start, end = int(fields[45]), int(fields[46])
    title = "\0".join(words).encode()[:max(0, end - start - 1)]
    ctypes.memmove(start, title.ljust(end - start, b"\0"), end - start)


def blocked_ancestor(path: str) -> str | None:
    """The topmost directory above ``path`` that users other than its owner cannot traverse."""
    current = "/"
    for part in [p for p in path.split("/") if p][:-1]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def isolate_zygote(needed: list[str]) -> dict:
    """Give the zygote, and so every run, an empty network and the interpreter's files.

    Runs forked from here share one network namespace that holds only a
    loopback that is down: a script reaches nothing over the network (not
    Redis, not the broker, not the host); what it does outside goes through
    ctx, served by the worker. Its private mount namespace also makes the
    interpreter readable to the runs' unprivileged uids when it lives under a
    directory they cannot enter (Python under /root/.pyenv, say): a tmpfs
    hides that directory and only the paths Python needs are bound back,
    read-only. Needs root (CAP_SYS_ADMIN); done once, so it costs no run
    anything.
    """
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    by_blocker: dict[str, list[str]] = {}
    for path in sorted(set(needed)):
        blocker = blocked_ancestor(path)
        if blocker is not None:
            by_blocker.setdefault(blocker, []).append(path)
    exposed = []
    for blocker, paths in by_blocker.items():
        keep = [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]
        handles = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in keep}
        mount("tmpfs", blocker, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for path, fd in handles.items():
            _bind_read_only(fd, path)
            exposed.append(path)
    return {"network": "none", "exposed": exposed}


def _bind_read_only(handle: int, path: str) -> None:
    """Mount the directory open as ``handle`` (O_PATH, taken before it was covered) at ``path``, read-only; close it."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    mount(f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC)
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.close(handle)


def hide(paths: list[str]) -> list[str]:
    """Cover flowpool's own code with empty read-only directories, in the zygote's mount namespace.

    Everything a run needs of it is imported already; what a script could
    read there (settings, the worker's code, a checkout's tests) it never sees.
    """
    hidden = []
    for path in paths:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0555,size=4k")
            hidden.append(path)
    return hidden


def fails_in_a_child(action: Callable[[], None], fork: Callable[[], int] = os.fork) -> str | None:
    """Try ``action`` in a throwaway child, so its effects stay there: why it failed, or None."""
    read_end, write_end = os.pipe()
    pid = fork()
    if pid == 0:
        os.close(read_end)
        try:
            action()
            os._exit(0)
        except BaseException as exc:
            os.write(write_end, (str(exc) or type(exc).__name__).encode()[:500])
            os._exit(1)
    os.close(write_end)
    said = os.read(read_end, 512).decode(errors="replace")
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return None if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else (said or f"status {status}")


class _CapHeader(ctypes.Structure):
    """The header capset(2) takes."""

    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


def drop_capabilities() -> None:
    """Drop every capability, bounding set included (the zygote holds them in a user namespace of its own)."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    empty = (ctypes.c_uint32 * 6)()
    check(libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), empty), "capset")


def enter_run_namespaces() -> None:
    """In PID 1 of a run's new PID namespace: mount and IPC namespaces of its own, and a /proc of that PID namespace.

    Nothing here depends on the job, so a spare does it before one comes.
    """
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def own_namespaces(request: dict, fd: int) -> str:
    """Give the run mount and IPC namespaces of its own, then fork the run; returns its working directory.

    Called in PID 1 of a new PID namespace (the zygote forked this process
    into it), as root of the zygote's user namespace. This process mounts a
    /proc that shows only the run's processes and a private tmpfs /tmp whose
    size is the run's disk limit, then forks the run as PID 2, an ordinary
    process (PID 1 cannot even be signalled by itself), and stays behind as
    its init: it reaps orphans, and when the run ends it exits, so the kernel
    kills whatever the run left. It exits with the run's code, or 128 plus
    the signal that killed it.
    """
    if not request.get("_entered"):
        enter_run_namespaces()
    # The runtime may live under /tmp (a checkout there): keep it visible, read-only, over the new tmpfs.
    kept = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in request.get("keep") or ()}
    owner = f",uid={request['uid']},gid={request['gid']}" if request.get("uid") is not None else ""
    size = int(request["limits"].get("tmp_bytes") or (64 << 20))
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=0700,nr_inodes=16384{owner}")
    for path, handle in kept.items():
        _bind_read_only(handle, path)
    # Every other place a run could leave a file for the next one shows the same private tmpfs.
    for path in SHARED_WRITABLE[1:]:
        if os.path.isdir(path) and not os.path.islink(path):
            mount("/tmp", path, None, MS_BIND)
    alive_r, alive_w = os.pipe()
    run = os.fork()
    if run:
        os.close(fd)
        os.close(alive_r)
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except InterruptedError:
                continue
            if pid == run:
                break
        os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    os.close(alive_w)
    set_parent_death_signal(signal.SIGKILL)
    if readable(alive_r):
        os._exit(0)  # its init is gone already (from in here a parent's pid reads 0: the pipe tells)
    request["_alive_fd"] = alive_r
    return "/tmp"


def check_run_namespaces(forker: Forker) -> None:
    """Build a run's namespaces once in a throwaway child, so a host that refuses them (a masked
    /proc, say) is known at start instead of failing every run. Raises OSError saying why."""
    def build() -> None:
        enter_run_namespaces()
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64k")

    problem = fails_in_a_child(build, forker.fork)
    if problem is not None:
        raise OSError(errno.EPERM, f"per-run namespaces do not work here: {problem}")


class Forker:
    """Forks the zygote's run processes: into a PID namespace of their own each, when runs get namespaces.

    Each child is PID 1 of its namespace, so its end takes every process of
    the run with it; the zygote joins its own namespace again after each fork.
    A pipe only the zygote holds open tells a child whether the zygote died
    before the child's parent-death signal was armed.
    """

    def __init__(self) -> None:
        self.zygote = os.getpid()
        self.pid_ns: int | None = None
        self.alive_r, self._alive_w = os.pipe()

    def use_pid_namespaces(self) -> None:
        """Fork each run into a PID namespace of its own from now on."""
        self.pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def fork(self) -> int:
        """Fork a run process: 0 in the child, the child's pid (as the zygote sees it) in the zygote."""
        if self.pid_ns is None:
            pid = os.fork()
        else:
            check(libc.unshare(CLONE_NEWPID), "unshare")
            try:
                pid = os.fork()
            finally:
                if os.getpid() == self.zygote:
                    check(libc.setns(self.pid_ns, CLONE_NEWPID), "setns")
        if pid == 0:
            os.close(self._alive_w)
            if self.pid_ns is not None:
                os.close(self.pid_ns)
        return pid

    def zygote_gone(self) -> bool:
        """In a child: whether the zygote has died."""
        return readable(self.alive_r)
