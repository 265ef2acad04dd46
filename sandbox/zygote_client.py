"""The worker's client of the zygote: starts it, asks it to spawn and reap run processes, hears of their exits.

It speaks the control protocol :mod:`.zygote` specifies. One reader thread
takes every message the zygote sends; callers block on their own request only,
so any number of worker threads may spawn at once. A zygote that dies is
started again by the next request; one it died under is sent once more (a
request fails only with the zygote it was sent to).
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import threading
from typing import Any

from flowpool.errors import SandboxError
from flowpool.procs import set_parent_death_signal

from .backends import PROCESS_WARNING, Backend
from .channel import blocking_pair

__all__ = ["Zygote"]


class _Pending:
    """A request waiting for the answer of the zygote it was sent to."""

    def __init__(self, zygote: subprocess.Popen[bytes]) -> None:
        self.zygote = zygote  # only that zygote's end fails the request
        self.event = threading.Event()
        self.reply: dict[str, Any] | None = None


class Zygote:
    """Client of the zygote process; thread-safe, restarts it if it dies."""

    def __init__(self, env: dict[str, str] | None = None, backend: Backend | None = None) -> None:
        self._env = env or {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        self.backend = backend or Backend("process")
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._exits: dict[int, dict[str, int]] = {}
        self._exit_events: dict[int, threading.Event] = {}
        self._exit_lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._hello = threading.Event()
        self.isolation: dict[str, Any] = {}

    def findings(self) -> list[str]:
        """What isolation the zygote achieved, a part each; what is missing starts with WARNING."""
        info = self.isolation
        if not info:
            return ["zygote not started"]
        parts = []
        if info.get("backend") == "bwrap":
            parts.append("bwrap: read-only root holding only the runtime, no capabilities"
                         + ("" if os.geteuid() == 0 else ", user namespace"))
        if info.get("network") == "none":
            parts.append("empty network namespace")
        else:
            parts.append(f"WARNING: runs share the host network ({info.get('error') or 'not running as root'})")
        parts.append("per-run PID, mount and IPC namespaces with a private size-limited /tmp"
                     if info.get("namespaces") else
                     "WARNING: no per-run namespaces (/tmp is a directory on disk, only file size is limited)")
        parts.append("seccomp filter" if info.get("seccomp") else "WARNING: no seccomp filter on this host")
        if info.get("unreadable"):
            parts.append(f"WARNING: runs' uids cannot enter {', '.join(info['unreadable'])}, where the interpreter "
                         "lives: scripts can import only what the zygote imported (install Python elsewhere)")
        if info.get("backend") != "bwrap":
            parts.append(PROCESS_WARNING)
        return parts

    def start(self, timeout: float = 30.0) -> None:
        """Start the zygote and wait until it says hello."""
        with self._lock:
            self._start_locked()
        if not self._hello.wait(timeout):
            raise SandboxError(f"the sandbox zygote did not start within {timeout}s")

    def _start_locked(self) -> None:
        self._hello.clear()
        parent, child = blocking_pair(socket.SOCK_SEQPACKET)
        config = {"backend": self.backend.name, "hide": self.backend.hidden, "runtime": self.backend.runtime}
        self._process = subprocess.Popen(
            [*self.backend.prefix, self.backend.interpreter, "-I", "-m", "flowpool.sandbox.zygote", str(child.fileno()),
             json.dumps(config)],
            env=self._env, stdin=subprocess.DEVNULL, close_fds=True, pass_fds=(child.fileno(),),
            preexec_fn=set_parent_death_signal,
        )
        child.close()
        self._control = parent
        reader = threading.Thread(target=self._read, args=(parent, self._process), name="flowpool-zygote-reader",
                                  daemon=True)
        reader.start()

    def _read(self, control: socket.socket, zygote: subprocess.Popen[bytes]) -> None:
        while True:
            try:
                data = control.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._fail_pending(control, zygote)
                return
            message = json.loads(data)
            if message["op"] == "hello":
                self.isolation = message
                self._hello.set()
                continue
            if message["op"] == "exited":
                with self._exit_lock:
                    event = self._exit_events.get(message["pid"])
                    if event is not None:  # else a process already forgotten
                        self._exits[message["pid"]] = message["status"]
                if event is not None:
                    event.set()
                continue
            pending = self._pending.pop(message.get("id"), None)
            if pending is not None:
                pending.reply = message
                pending.event.set()

    def _fail_pending(self, control: socket.socket, zygote: subprocess.Popen[bytes]) -> None:
        with self._lock:
            if self._control is control:
                self._control = None
        # Only the requests sent to this zygote: one a successor has already taken must not be sent
        # again, or a run's channel goes to two processes, which split the job's frame between them.
        for key, pending in list(self._pending.items()):
            if pending.zygote is zygote and self._pending.pop(key, None) is not None:
                pending.reply = {"op": "failed", "message": self._EXITED}
                pending.event.set()

    _EXITED = "the sandbox zygote exited"

    def _request(self, message: dict[str, Any], fds: list[int] | None = None, timeout: float = 10.0,
                 retry: bool = True) -> _Pending:
        """Send ``message`` and wait for the answer; returns the answered request (``.zygote``: who answered)."""
        with self._lock:
            if not self._alive_locked():
                self._stop_locked()
                self._start_locked()
            assert self._process is not None
            pending = _Pending(self._process)
            message["id"] = next(self._ids)
            self._pending[message["id"]] = pending
            assert self._control is not None
            try:
                socket.send_fds(self._control, [json.dumps(message).encode()], fds or [])
            except OSError:
                self._pending.pop(message["id"], None)
                pending.reply = {"op": "failed", "message": self._EXITED}
                pending.event.set()
        if not pending.event.wait(timeout):
            self._pending.pop(message["id"], None)
            raise SandboxError(f"the sandbox zygote did not answer {message['op']} within {timeout}s")
        assert pending.reply is not None
        if retry and pending.reply.get("message") == self._EXITED:
            # The zygote died as the request went out: the next request starts a new one.
            return self._request(message, fds, timeout, retry=False)
        if pending.reply["op"] == "failed":
            raise SandboxError(f"could not {message['op']} a sandbox process: {pending.reply['message']}")
        return pending

    def spawn(self, workdir: str, limits: dict[str, int | None], uid: int | None, gid: int | None,
              cgroup_fds: list[int] | None = None) -> tuple[int, socket.socket, subprocess.Popen[bytes]]:
        """Fork a run process, in the cgroups whose ``cgroup.procs`` files are open as ``cgroup_fds``;
        returns its pid, the worker's end of its channel and the zygote that forked it."""
        ours, theirs = blocking_pair()
        try:
            answered = self._request({"op": "spawn", "workdir": workdir, "limits": limits, "uid": uid, "gid": gid},
                                     [theirs.fileno(), *(cgroup_fds or [])])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        assert answered.reply is not None
        pid = answered.reply["pid"]
        with self._exit_lock:
            self._exit_events.setdefault(pid, threading.Event())
        return pid, ours, answered.zygote

    def running(self, zygote: subprocess.Popen[bytes] | None) -> bool:
        """Whether ``zygote`` (as :meth:`spawn` gave it) is the one running now.

        What a zygote forked dies with it (a parent-death signal), but not at
        the same instant: until then its pidfd says it is alive.
        """
        with self._lock:
            return zygote is not None and zygote is self._process and self._alive_locked()

    def _alive_locked(self) -> bool:
        """Whether the current zygote is up and its control socket open (the caller holds the lock)."""
        return self._control is not None and self._process is not None and self._process.poll() is None

    def wait_exit(self, pid: int, timeout: float) -> dict[str, int] | None:
        """The exit status of a run process, or None if it is still running after ``timeout``."""
        with self._exit_lock:
            event = self._exit_events.setdefault(pid, threading.Event())
        event.wait(timeout)
        with self._exit_lock:
            return self._exits.get(pid)

    def reap(self, pid: int, workdir: str, uid: int | None, gid: int | None, sweep: bool = True) -> None:
        """Kill whatever the run left and remove its files.

        Without ``sweep`` only the run's process group is killed: the caller
        promises to start the slot's next process at once, which kills every
        other process of the uid before it takes a job.
        """
        try:
            self._request({"op": "reap", "pid": pid, "workdir": workdir, "uid": uid, "gid": gid, "sweep": sweep})
        finally:
            self.forget(pid)

    def forget(self, pid: int) -> None:
        """Drop what is known of a run process's exit (it is gone, or will be reaped without anyone asking)."""
        with self._exit_lock:
            self._exits.pop(pid, None)
            self._exit_events.pop(pid, None)

    def stop(self) -> None:
        """Stop the zygote; the run processes it forked die with it."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None

