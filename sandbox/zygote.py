"""The zygote: a warm, pre-imported process that forks one sandboxed process per run.

The worker starts it as a fresh interpreter (``python -I -m flowpool.sandbox.zygote``)
with a scrubbed environment, so it holds no settings, no secrets and no
connections: a forked run inherits nothing of the worker. It talks to the
worker over a SOCK_SEQPACKET control socket (its fd number is argv[1]), one JSON message per packet:

  worker -> zygote  {"op": "spawn", "id", "limits": {...}, "uid", "gid", "workdir"} + the run's channel fd,
                      then the slot's cgroup.procs files, if any (the run joins them before anything else)
                    {"op": "reap", "id", "pid", "uid", "workdir", "sweep"}   (kill what is left of a run, remove its files)
  zygote -> worker  {"op": "spawned", "id", "pid"} | {"op": "reaped", "id"} | {"op": "failed", "id", "message"}
                    {"op": "exited", "pid", "status": {"code": n} | {"signal": n}}

argv[2] is a JSON config: the backend it was started under and flowpool's own
package directories, which it covers once imported.

Where it is privileged (under bwrap; as root with the process backend) each
run gets PID, mount and IPC namespaces of its own (see :mod:`.namespaces`):
the worker's pid is the run's init, killing it ends the run and everything
it started, and no reap or work directory is needed.
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
import sys
import time  # noqa: F401
import traceback
import typing  # noqa: F401
import uuid  # noqa: F401

import flowpool_workflow  # noqa: F401
import maitai_workflow  # noqa: F401  (scripts written for it import it; its files are hidden from runs)

from flowpool.procs import set_parent_death_signal

from . import linux, runtime, seccomp
from .channel import blocking_pair, blocking_socket
from .namespaces import (SHARED_WRITABLE, Forker, blank_command_line, blocked_ancestor, check_run_namespaces,
                         drop_capabilities, enter_run_namespaces, fails_in_a_child, hide, isolate_zygote,
                         own_namespaces)

_LIMITS = {
    "memory_bytes": (resource.RLIMIT_AS,),
    "processes": (resource.RLIMIT_NPROC,),
    "open_files": (resource.RLIMIT_NOFILE,),
    "file_bytes": (resource.RLIMIT_FSIZE,),
    "cpu_seconds": (resource.RLIMIT_CPU,),
}


# A spawn's file descriptors: the run's channel and up to one cgroup.procs per cgroup hierarchy.
_MAX_FDS = 8


def _seccomp_works() -> bool:
    """Whether the seccomp filter installs here."""
    return seccomp.available() and fails_in_a_child(seccomp.install) is None


def _remove_files_of(uid: int) -> None:
    """Remove what ``uid`` left in the shared writable directories. Run as that uid, never as root:
    what it can remove is exactly what it owns there (the directories are sticky), links are not followed."""
    for directory in SHARED_WRITABLE:
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


def _decode_status(status: int, relayed: bool) -> dict[str, int]:
    """A child's exit status for the worker; ``relayed``: by an init that exits 128 + the run's signal."""
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    code = os.WEXITSTATUS(status)
    if relayed and code > 128:
        return {"signal": code - 128}
    return {"code": code}


def _parent_gone(request: dict, forker: Forker) -> bool:
    """Whether the process this one must die with is gone already (so its death signal came too early)."""
    alive = request.get("_alive_fd")
    if alive is not None:
        return linux.readable(alive)
    return forker.zygote_gone()


def _join_cgroups(fds: list[int]) -> None:
    """Move this process into its slot's cgroups (``0`` names the writer), so all it forks is born there.

    The files were opened by the worker: the kernel checks its credentials and
    cgroup namespace, which a zygote inside bwrap lacks.
    """
    for fd in fds:
        os.write(fd, b"0")
        os.close(fd)


def _become_run(request: dict, fd: int, control: socket.socket, forker: Forker, cgroup_fds: list[int]) -> None:
    """In the forked child: drop everything of the zygote, apply limits, run the job. Never returns."""
    code = 0
    try:
        _join_cgroups(cgroup_fds)  # fails closed: a run that cannot join its cgroup never takes its job
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
            workdir = own_namespaces(request, fd)
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
            drop_capabilities()
        if request.get("_alive_fd") is not None:
            os.close(request["_alive_fd"])
        os.close(forker.alive_r)
        if request.get("seccomp"):
            seccomp.install()  # sets no_new_privs too
        else:
            linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        # The hint says the sandbox has no network only where it has none; it is never the barrier.
        # Only a run with namespaces of its own may serve a second run: its /tmp and its processes are its own.
        runtime.serve(fd, no_network=bool(request.get("seccomp")) or request.get("network") == "none",
                      reusable=bool(request.get("namespaces")))
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

    def __init__(self, close_in_child: list[int], forker: Forker) -> None:
        self._close_in_child = close_in_child
        self._forker = forker
        self.pid: int | None = None
        self._sock: socket.socket | None = None

    def refill(self) -> None:
        if self.pid is not None:
            return
        ours, theirs = blocking_pair(socket.SOCK_SEQPACKET)
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
                    enter_run_namespaces()
                    entered = True
                except OSError:
                    pass  # tried again, and reported, once a job comes
            try:
                data, fds, _, _ = socket.recv_fds(theirs, 65536, _MAX_FDS)
            except BaseException:
                os._exit(0)
            if not data or not fds:
                os._exit(0)  # the zygote went away before using us
            _become_run({**json.loads(data), "_entered": entered}, fds[0], theirs, self._forker, fds[1:])
        theirs.close()
        self.pid, self._sock = pid, ours

    def take(self, request: dict, fds: list[int]) -> int | None:
        """Hand a run (its channel, then its cgroup files) to the spare: its pid, or None if it is gone."""
        pid, sock = self.pid, self._sock
        self.pid = self._sock = None
        if pid is None or sock is None:
            return None
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], fds)
            return pid
        except OSError:
            return None
        finally:
            sock.close()


def main(control_fd: int, config: dict) -> None:
    blank_command_line()  # runs forked from here must not read host paths in /proc/1/cmdline
    set_parent_death_signal(signal.SIGKILL)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    control = blocking_socket(control_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the worker, which stops us
    reaping: dict[int, dict] = {}  # helper pid -> its reap request
    forker = Forker()
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
            isolation.update(isolate_zygote([p for p in sys.path if p and os.path.isdir(p)]), namespaces=True)
        if isolation["namespaces"]:
            isolation["hidden"] = hide(config.get("hide") or [])
            forker.use_pid_namespaces()
            check_run_namespaces(forker)
    except OSError as exc:  # e.g. a container without CAP_SYS_ADMIN, or a masked /proc
        isolation.update(error=str(exc), namespaces=False)
        forker.pid_ns = None
    isolation["seccomp"] = _seccomp_works()
    if os.geteuid() == 0 and not isolation["namespaces"] and isolation["backend"] == "process":
        # Runs get uids of their own but no mount namespace to make the interpreter readable to them.
        isolation["unreadable"] = sorted({b for p in sys.path if p and (b := blocked_ancestor(p))})
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

    def spawn(request: dict, fds: list[int]) -> int:
        request.update(namespaces=isolation["namespaces"], seccomp=isolation["seccomp"], keep=kept_under_tmp,
                       network=isolation["network"])
        if not isolation["namespaces"]:  # else the run works in a tmpfs of its own
            os.makedirs(request["workdir"], mode=0o700)
            if request.get("uid") is not None:
                os.chown(request["workdir"], request["uid"], request["gid"])
        pid = spares.take(request, fds)
        if pid is None:
            pid = forker.fork()
            if pid == 0:
                _become_run(request, fds[0], control, forker, fds[1:])
        return pid

    # Move everything imported so far out of the collector's reach, so runs
    # forked from here do not copy those pages when a collection walks them.
    gc.collect()
    gc.freeze()
    spares.refill()
    poller = select.poll()  # not select(): the worker may hand over descriptors numbered past 1024
    poller.register(control, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            ready = {fd for fd, _ in poller.poll()}  # descriptor numbers
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            collect_exits()
        if control.fileno() not in ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(control, 65536, _MAX_FDS)
        except InterruptedError:
            continue
        if not data:
            return  # the worker went away
        request = json.loads(data)
        try:
            if request["op"] == "spawn":
                pid = spawn(request, fds)
                for fd in fds:
                    os.close(fd)
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
