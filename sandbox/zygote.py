"""The zygote: a warm, pre-imported process that forks one sandboxed process per run.

The worker starts it as a fresh interpreter (``python -I -m flowpool.sandbox.zygote``)
with a scrubbed environment, so it holds no settings, no secrets and no
connections: a forked run inherits nothing of the worker. It talks to the
worker over a SOCK_SEQPACKET control socket (its fd number is argv[1]), one JSON message per packet:

  worker -> zygote  {"op": "spawn", "id", "limits": {...}, "uid", "gid", "workdir"} + the run's channel fd
                    {"op": "reap", "id", "pid", "uid", "workdir", "sweep"}   (kill what is left of a run, remove its files)
  zygote -> worker  {"op": "spawned", "id", "pid"} | {"op": "reaped", "id"} | {"op": "failed", "id", "message"}
                    {"op": "exited", "pid", "status": {"code": n} | {"signal": n}}

argv[2] is a JSON config: the backend it was started under and flowpool's own
package directories, which it covers once imported.

Where it is privileged (under bwrap; as root with the process backend) each
run gets PID, mount and IPC namespaces of its own (see ``_Forker`` and
``_own_namespaces``): the worker's pid is the run's init, killing it ends the
run and everything it started, and no reap or work directory is needed.
Otherwise it is a child subreaper, so processes a run leaves behind are
reparented to it and reaped, never zombies, and a reap kills them by uid.
It dies with the worker (parent-death signal).
"""
from __future__ import annotations

# Pre-import what runs commonly use, so a forked run starts warm (and, where the
# run's uid cannot read the interpreter's directory, so that it can use them at all).
import base64  # noqa: F401
import collections  # noqa: F401
import concurrent.futures  # noqa: F401
import copy  # noqa: F401
import csv  # noqa: F401
import dataclasses  # noqa: F401
import datetime  # noqa: F401
import decimal  # noqa: F401
import encodings.idna  # noqa: F401  (host names)
import enum  # noqa: F401
import heapq  # noqa: F401
import html  # noqa: F401
import statistics  # noqa: F401
import string  # noqa: F401
import subprocess  # noqa: F401
import tempfile  # noqa: F401
import textwrap  # noqa: F401
import unicodedata  # noqa: F401
import urllib.parse  # noqa: F401
import ctypes
import errno
import gc
import functools  # noqa: F401
import hashlib  # noqa: F401
import itertools  # noqa: F401
import json
import marshal  # noqa: F401
import math  # noqa: F401
import os
import random  # noqa: F401
import re  # noqa: F401
import resource
import select
import shutil
import signal
import socket
import stat
import sys
import time  # noqa: F401
import traceback
import typing  # noqa: F401
from typing import Callable
import uuid  # noqa: F401

import flowpool_workflow  # noqa: F401
import maitai_workflow  # noqa: F401  (scripts written for it import it; its files are hidden from runs)

from ..procs import set_parent_death_signal
from . import runtime, seccomp

_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18

_LIMITS = {
    "memory_bytes": (resource.RLIMIT_AS,),
    "processes": (resource.RLIMIT_NPROC,),
    "open_files": (resource.RLIMIT_NOFILE,),
    "file_bytes": (resource.RLIMIT_FSIZE,),
    "cpu_seconds": (resource.RLIMIT_CPU,),
}


def _prctl(option: int, arg: int) -> None:
    _libc.prctl(option, arg, 0, 0, 0)


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                       data and data.encode()), f"mount {target}")


def _blocked_ancestor(path: str) -> str | None:
    """The topmost directory above ``path`` that users other than its owner cannot traverse."""
    current = "/"
    for part in [p for p in path.split("/") if p][:-1]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _isolate(needed: list[str]) -> dict:
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
    _check(_libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET), "unshare")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    by_blocker: dict[str, list[str]] = {}
    for path in sorted(set(needed)):
        blocker = _blocked_ancestor(path)
        if blocker is not None:
            by_blocker.setdefault(blocker, []).append(path)
    exposed = []
    for blocker, paths in by_blocker.items():
        keep = [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]
        handles = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in keep}
        _mount("tmpfs", blocker, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=64k")
        for path, fd in handles.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
            _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
            os.close(fd)
            exposed.append(path)
    return {"network": "none", "exposed": exposed}


def _hide(paths: list[str]) -> list[str]:
    """Cover flowpool's own code with empty read-only directories, in the zygote's mount namespace.

    Everything a run needs of it is imported already; what a script could
    read there (settings, the worker's code, a checkout's tests) it never sees.
    """
    hidden = []
    for path in paths:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mode=0555,size=4k")
            hidden.append(path)
    return hidden


def _fails_in_a_child(action: Callable[[], None], fork: Callable[[], int] = os.fork) -> str | None:
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


def _seccomp_works() -> bool:
    """Whether the seccomp filter installs here."""
    return seccomp.available() and _fails_in_a_child(seccomp.install) is None


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


def _drop_capabilities() -> None:
    """Drop every capability, bounding set included (the zygote holds them in a user namespace of its own)."""
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    empty = (ctypes.c_uint32 * 6)()
    _check(_libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), empty), "capset")


# Directories every uid may write to on a usual host: what a run leaves there outlives it
# unless the run has them in a mount namespace of its own, or they are swept by uid.
_SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def _remove_files_of(uid: int) -> None:
    """Remove what ``uid`` left in the shared writable directories. Run as that uid, never as root:
    what it can remove is exactly what it owns there (the directories are sticky), links are not followed."""
    for directory in _SHARED_WRITABLE:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _enter_run_namespaces() -> None:
    """In PID 1 of a run's new PID namespace: mount and IPC namespaces of its own, and a /proc of that PID namespace.

    Nothing here depends on the job, so a spare does it before one comes.
    """
    _check(_libc.unshare(_CLONE_NEWNS | _CLONE_NEWIPC), "unshare")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def _own_namespaces(request: dict, fd: int) -> str:
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
        _enter_run_namespaces()
    # The runtime may live under /tmp (a checkout there): keep it visible, read-only, over the new tmpfs.
    kept = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in request.get("keep") or ()}
    owner = f",uid={request['uid']},gid={request['gid']}" if request.get("uid") is not None else ""
    size = int(request["limits"].get("tmp_bytes") or (64 << 20))
    _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=0700,nr_inodes=16384{owner}")
    for path, handle in kept.items():
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{handle}", path, None, _MS_BIND | _MS_REC)
        _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        os.close(handle)
    # Every other place a run could leave a file for the next one shows the same private tmpfs.
    for path in _SHARED_WRITABLE[1:]:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("/tmp", path, None, _MS_BIND)
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
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(0)  # its init is gone already (from in here a parent's pid reads 0: the pipe tells)
    request["_alive_fd"] = alive_r
    return "/tmp"


def _check_run_namespaces(forker: "_Forker") -> None:
    """Build a run's namespaces once in a throwaway child, so a host that refuses them (a masked
    /proc, say) is known at start instead of failing every run. Raises OSError saying why."""
    def build() -> None:
        _enter_run_namespaces()
        _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k")

    problem = _fails_in_a_child(build, forker.fork)
    if problem is not None:
        raise OSError(errno.EPERM, f"per-run namespaces do not work here: {problem}")


class _Forker:
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
        self.pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def fork(self) -> int:
        if self.pid_ns is None:
            pid = os.fork()
        else:
            _check(_libc.unshare(_CLONE_NEWPID), "unshare")
            try:
                pid = os.fork()
            finally:
                if os.getpid() == self.zygote:
                    _check(_libc.setns(self.pid_ns, _CLONE_NEWPID), "setns")
        if pid == 0:
            os.close(self._alive_w)
            if self.pid_ns is not None:
                os.close(self.pid_ns)
        return pid

    def zygote_gone(self) -> bool:
        """In a child: whether the zygote has died."""
        return bool(select.select([self.alive_r], [], [], 0)[0])


def _decode_status(status: int, relayed: bool) -> dict[str, int]:
    """A child's exit status for the worker; ``relayed``: by an init that exits 128 + the run's signal."""
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    code = os.WEXITSTATUS(status)
    if relayed and code > 128:
        return {"signal": code - 128}
    return {"code": code}


def _parent_gone(request: dict, forker: _Forker) -> bool:
    """Whether the process this one must die with is gone already (so its death signal came too early)."""
    alive = request.get("_alive_fd")
    if alive is not None:
        return bool(select.select([alive], [], [], 0)[0])
    return forker.zygote_gone()


def _become_run(request: dict, fd: int, control: socket.socket, forker: _Forker) -> None:
    """In the forked child: drop everything of the zygote, apply limits, run the job. Never returns."""
    code = 0
    try:
        control.close()
        os.setsid()
        set_parent_death_signal(signal.SIGKILL)
        if forker.zygote_gone():
            return  # the zygote is gone already: its runs go with it
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(devnull, target)
        low, high = sorted((fd, forker.alive_r))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, 65536)
        workdir = request["workdir"]
        if request.get("namespaces"):
            workdir = _own_namespaces(request, fd)
        os.chdir(workdir)
        os.umask(0o077)  # what a run writes where others could look (a shared /tmp) is its own
        for name, value in request["limits"].items():
            if value is not None and name in _LIMITS:
                resource.setrlimit(_LIMITS[name][0], (int(value), int(value)))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        uid, gid = request.get("uid"), request.get("gid")
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            # Changing credentials clears the parent-death signal: arm it again,
            # so the run still dies with the zygote (and so with the worker).
            set_parent_death_signal(signal.SIGKILL)
            if _parent_gone(request, forker):
                return  # the parent died before the signal was armed
            # Whatever an earlier run of this uid left behind dies now, before
            # this process takes a job (the signal spares the sender). In a
            # PID namespace of its own there is nobody else to find.
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not request.get("namespaces"):
                _remove_files_of(uid)  # and the files it left outside its work directory
        elif request.get("namespaces"):
            _drop_capabilities()
        if request.get("_alive_fd") is not None:
            os.close(request["_alive_fd"])
        os.close(forker.alive_r)
        if request.get("seccomp"):
            seccomp.install()  # sets no_new_privs too
        else:
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        runtime.serve(fd)
    except BaseException:
        code = 70
        try:
            os.write(2, traceback.format_exc().encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def _start_reap(request: dict) -> int | None:
    """Start killing every process left by a run; returns the helper's pid, or None when done already.

    A helper running as the run's uid can signal exactly that uid's processes,
    including any that left the run's session. The zygote does not wait for
    it, so spawns go on meanwhile; its exit finishes the reap.
    """
    uid = request.get("uid")
    if request.get("namespaces"):
        return None  # the run's PID namespace ended with it, and everything in it
    if uid is None:
        # Without a uid of its own the run can only be found by its process
        # group. (Once the group is empty its id may be reused: a weaker
        # guarantee, like everything about running runs as the worker's uid.)
        try:
            os.killpg(request["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return None
    if not request.get("sweep"):
        return None  # the slot's next process sweeps the uid when it starts
    helper = os.fork()
    if helper == 0:
        try:
            os.setgroups([])
            os.setgid(request["gid"])
            os.setuid(uid)
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass  # nothing of the uid runs
            _remove_files_of(uid)
        except BaseException:
            pass
        os._exit(0)
    return helper


class _Spares:
    """One process forked ahead of need, so a spawn costs a message instead of a fork."""

    def __init__(self, close_in_child: list[int], forker: _Forker) -> None:
        self._close_in_child = close_in_child
        self._forker = forker
        self.pid: int | None = None
        self._sock: socket.socket | None = None

    def refill(self) -> None:
        if self.pid is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = self._forker.fork()
        if pid == 0:
            ours.close()
            # Die with the zygote from now on; if it is already gone, go too.
            set_parent_death_signal(signal.SIGKILL)
            if self._forker.zygote_gone():
                os._exit(0)
            signal.set_wakeup_fd(-1)
            for fd in self._close_in_child:
                try:
                    os.close(fd)
                except OSError:
                    pass
            entered = False
            if self._forker.pid_ns is not None:  # runs get namespaces: enter them ahead of the job
                try:
                    _enter_run_namespaces()
                    entered = True
                except OSError:
                    pass  # tried again, and reported, once a job comes
            try:
                data, fds, _, _ = socket.recv_fds(theirs, 65536, 1)
            except BaseException:
                os._exit(0)
            if not data or not fds:
                os._exit(0)  # the zygote went away before using us
            _become_run({**json.loads(data), "_entered": entered}, fds[0], theirs, self._forker)
        theirs.close()
        self.pid, self._sock = pid, ours

    def take(self, request: dict, fd: int) -> int | None:
        """Hand a run to the spare; its pid, or None if there was none or it is gone."""
        pid, sock = self.pid, self._sock
        self.pid = self._sock = None
        if pid is None or sock is None:
            return None
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], [fd])
            return pid
        except OSError:
            return None
        finally:
            sock.close()


def main(control_fd: int, config: dict) -> None:
    set_parent_death_signal(signal.SIGKILL)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the worker, which stops us
    reaping: dict[int, dict] = {}  # helper pid -> its reap request
    forker = _Forker()
    spares = _Spares([control_fd, wake_r, wake_w], forker)

    def send(message: dict) -> None:
        control.send(json.dumps(message).encode())

    isolation: dict = {"backend": config.get("backend", "process"), "network": "shared", "exposed": [],
                       "namespaces": False, "hidden": []}
    try:
        if isolation["backend"] == "bwrap":
            # bwrap built the root, the empty network and (when not root) the user namespace in which
            # this process holds the capabilities it needs to give each run namespaces of its own.
            isolation.update(network="none", namespaces=True)
        elif os.geteuid() == 0:
            isolation.update(_isolate([p for p in sys.path if p and os.path.isdir(p)]), namespaces=True)
        if isolation["namespaces"]:
            isolation["hidden"] = _hide(config.get("hide") or [])
            forker.use_pid_namespaces()
            _check_run_namespaces(forker)
    except OSError as exc:  # e.g. a container without CAP_SYS_ADMIN, or a masked /proc
        isolation.update(error=str(exc), namespaces=False)
        forker.pid_ns = None
    isolation["seccomp"] = _seccomp_works()
    if os.geteuid() == 0 and not isolation["namespaces"] and isolation["backend"] == "process":
        # Runs get uids of their own but no mount namespace to make the interpreter readable to them.
        isolation["unreadable"] = sorted({b for p in sys.path if p and (b := _blocked_ancestor(p))})
    hidden = set(config.get("hide") or [])
    kept_under_tmp = [p for p in config.get("runtime") or [] if p.startswith("/tmp/") and p not in hidden
                      and os.path.isdir(p)]
    send({"op": "hello", "pid": os.getpid(), **isolation})

    def collect_exits() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == spares.pid:
                spares.pid = None
            request = reaping.pop(pid, None)
            if request is not None:
                shutil.rmtree(request["workdir"], ignore_errors=True)
                send({"op": "reaped", "id": request["id"]})
            else:
                send({"op": "exited", "pid": pid, "status": _decode_status(status, isolation["namespaces"])})

    def spawn(request: dict, fd: int) -> int:
        request.update(namespaces=isolation["namespaces"], seccomp=isolation["seccomp"], keep=kept_under_tmp)
        if not isolation["namespaces"]:  # else the run works in a tmpfs of its own
            os.makedirs(request["workdir"], mode=0o700)
            if request.get("uid") is not None:
                os.chown(request["workdir"], request["uid"], request["gid"])
        pid = spares.take(request, fd)
        if pid is None:
            pid = forker.fork()
            if pid == 0:
                _become_run(request, fd, control, forker)
        return pid

    # Move everything imported so far out of the collector's reach, so runs
    # forked from here do not copy those pages when a collection walks them.
    gc.collect()
    gc.freeze()
    spares.refill()
    while True:
        try:
            ready, _, _ = select.select([control, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            collect_exits()
        if control not in ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(control, 65536, 4)
        except InterruptedError:
            continue
        if not data:
            return  # the worker went away
        request = json.loads(data)
        try:
            if request["op"] == "spawn":
                pid = spawn(request, fds[0])
                os.close(fds[0])
                send({"op": "spawned", "id": request["id"], "pid": pid})
                spares.refill()  # after answering: the fork is off the caller's path
            elif request["op"] == "reap":
                helper = _start_reap({**request, "namespaces": isolation["namespaces"]})
                if helper is None:
                    shutil.rmtree(request["workdir"], ignore_errors=True)
                    send({"op": "reaped", "id": request["id"]})
                else:
                    reaping[helper] = request
        except Exception as exc:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            send({"op": "failed", "id": request.get("id"), "message": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
    sys.exit(0)
