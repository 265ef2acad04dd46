"""The zygote: a warm, pre-imported process that forks one sandboxed process per run.

The worker starts it as a fresh interpreter (``python -I -m flowpool.sandbox.zygote``)
with a scrubbed environment, so it holds no settings, no secrets and no
connections: a forked run inherits nothing of the worker. It talks to the
worker over a SOCK_SEQPACKET control socket (its fd number is argv[1]), one JSON message per packet:

  worker -> zygote  {"op": "spawn", "id", "limits": {...}, "uid", "gid", "workdir"} + the run's channel fd
                    {"op": "reap", "id", "pid", "uid", "workdir"}   (kill what is left of a run, remove its files)
  zygote -> worker  {"op": "spawned", "id", "pid"} | {"op": "reaped", "id"} | {"op": "failed", "id", "message"}
                    {"op": "exited", "pid", "status": {"code": n} | {"signal": n}}

It is a child subreaper, so processes a run leaves behind are reparented to it
and reaped, never zombies. It dies with the worker (parent-death signal).
"""
from __future__ import annotations

# Pre-import what runs commonly use, so a forked run starts warm.
import base64  # noqa: F401
import collections  # noqa: F401
import dataclasses  # noqa: F401
import datetime  # noqa: F401
import errno
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

from ..procs import set_parent_death_signal
from . import runtime

_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38

_LIMITS = {
    "memory_bytes": (resource.RLIMIT_AS,),
    "processes": (resource.RLIMIT_NPROC,),
    "open_files": (resource.RLIMIT_NOFILE,),
    "file_bytes": (resource.RLIMIT_FSIZE,),
    "cpu_seconds": (resource.RLIMIT_CPU,),
}


def _prctl(option: int, arg: int) -> None:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def _decode_status(status: int) -> dict[str, int]:
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"code": os.WEXITSTATUS(status)}


def _become_run(request: dict, fd: int, control: socket.socket) -> None:
    """In the forked child: drop everything of the zygote, apply limits, run the job. Never returns."""
    code = 0
    try:
        control.close()
        os.setsid()
        set_parent_death_signal(signal.SIGKILL)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(devnull, target)
        os.closerange(3, fd)
        os.closerange(fd + 1, 65536)
        os.chdir(request["workdir"])
        for name, value in request["limits"].items():
            if value is not None and name in _LIMITS:
                resource.setrlimit(_LIMITS[name][0], (int(value), int(value)))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        uid, gid = request.get("uid"), request.get("gid")
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
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
    if uid is None:
        try:
            os.killpg(request["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return None
    helper = os.fork()
    if helper == 0:
        try:
            os.setgroups([])
            os.setgid(request["gid"])
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass
        os._exit(0)
    return helper


def main(control_fd: int) -> None:
    set_parent_death_signal(signal.SIGKILL)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the worker, which stops us
    reaping: dict[int, dict] = {}  # helper pid -> its reap request

    def send(message: dict) -> None:
        control.send(json.dumps(message).encode())

    def collect_exits() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            request = reaping.pop(pid, None)
            if request is not None:
                shutil.rmtree(request["workdir"], ignore_errors=True)
                send({"op": "reaped", "id": request["id"]})
            else:
                send({"op": "exited", "pid": pid, "status": _decode_status(status)})

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
                os.makedirs(request["workdir"], mode=0o700)
                if request.get("uid") is not None:
                    os.chown(request["workdir"], request["uid"], request["gid"])
                pid = os.fork()
                if pid == 0:
                    _become_run(request, fds[0], control)
                os.close(fds[0])
                send({"op": "spawned", "id": request["id"], "pid": pid})
            elif request["op"] == "reap":
                helper = _start_reap(request)
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
        main(int(sys.argv[1]))
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
    sys.exit(0)
