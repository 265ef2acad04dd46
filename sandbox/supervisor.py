"""The worker's side of the sandbox: start the zygote, run one job per process, enforce limits.

Time limits are enforced here, not by Celery (whose limits only the prefork
pool enforces): the run process arms its own soft-limit timer, which raises
:class:`flowpool_workflow.SoftTimeLimitExceeded` in the script so its
``finally`` blocks run; the supervisor kills it at the hard limit, whatever
the script does, and whatever the run left behind dies with its PID
namespace (or, without one, with its uid). Each supervisor call blocks one
worker thread on a socket, so a thread pool holds many runs waiting on slow
model calls. The zygote starts under the backend :mod:`.backends` chooses.
"""
from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import Cancelled, ResultTooLarge, SandboxError, ScriptError, TimeLimitExceeded
from ..procs import set_parent_death_signal
from .backends import PROCESS_WARNING, Backend, choose, hidden_paths, runtime_paths
from .channel import Channel, ChannelClosed, ProtocolError

__all__ = ["CallFailed", "CallHandler", "RunOutcome", "Sandbox", "SandboxLimits", "Streamed", "Zygote"]

_SIGNAL_HINTS = {signal.SIGKILL: "killed (memory or CPU limit, or from outside)",
                 signal.SIGXCPU: "CPU time limit", signal.SIGSEGV: "segmentation fault"}


class CallFailed(Exception):
    """A ctx call the worker could not serve; the script gets ``kind`` and ``message``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass
class Streamed:
    """What a ctx call handler returns to answer with a stream of chunks."""

    chunks: Iterator[Any]


# on_call(method, params, deadline) -> a JSON value, or Streamed; deadline is on the monotonic clock.
CallHandler = Callable[[str, dict, float], Any]


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run process."""

    memory_bytes: int = 512 << 20
    processes: int = 32
    open_files: int = 64
    file_bytes: int = 64 << 20
    tmp_bytes: int = 64 << 20
    cpu_seconds: int | None = None  # None: the time limit's own backstop
    max_result_bytes: int = 2 << 20
    max_log_bytes: int = 256 << 10
    max_chunks: int = 10_000
    max_chunk_bytes: int = 64 << 10


@dataclass
class RunOutcome:
    """What a run produced: a result or an error, plus its logs."""

    result: Any = None
    result_json: str | None = None
    error: ScriptError | TimeLimitExceeded | SandboxError | ResultTooLarge | Cancelled | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    logs_truncated: bool = False
    chunks: int = 0
    pid: int | None = None
    skipped: bool = False  # the gate closed: the run was killed before it was followed

    @property
    def ok(self) -> bool:
        return self.error is None


class _Pending:
    def __init__(self) -> None:
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

    def describe(self) -> str:
        """What isolation the zygote achieved, in a line for people."""
        return "; ".join(self.findings()) if self.isolation else "not started"

    def findings(self) -> list[str]:
        """What isolation the zygote achieved, a part each; what is missing starts with WARNING."""
        info = self.isolation
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
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {"backend": self.backend.name, "hide": hidden_paths(), "runtime": runtime_paths()}
        self._process = subprocess.Popen(
            [*self.backend.prefix, sys.executable, "-I", "-m", "flowpool.sandbox.zygote", str(child.fileno()),
             json.dumps(config)],
            env=self._env, stdin=subprocess.DEVNULL, close_fds=True, pass_fds=(child.fileno(),),
            preexec_fn=set_parent_death_signal,
        )
        child.close()
        self._control = parent
        reader = threading.Thread(target=self._read, args=(parent,), name="flowpool-zygote-reader", daemon=True)
        reader.start()

    def _read(self, control: socket.socket) -> None:
        while True:
            try:
                data = control.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._fail_pending(control)
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

    def _fail_pending(self, control: socket.socket) -> None:
        with self._lock:
            if self._control is control:
                self._control = None
        for key in list(self._pending):
            pending = self._pending.pop(key, None)
            if pending is not None:
                pending.reply = {"op": "failed", "message": self._EXITED}
                pending.event.set()

    _EXITED = "the sandbox zygote exited"

    def _request(self, message: dict[str, Any], fds: list[int] | None = None, timeout: float = 10.0,
                 retry: bool = True) -> dict[str, Any]:
        pending = _Pending()
        with self._lock:
            if self._control is None or self._process is None or self._process.poll() is not None:
                self._stop_locked()
                self._start_locked()
            message["id"] = next(self._ids)
            self._pending[message["id"]] = pending
            assert self._control is not None
            try:
                socket.send_fds(self._control, [json.dumps(message).encode()], fds or [])
            except OSError:
                self._pending.pop(message["id"], None)
                pending.reply = {"op": "failed", "message": self._EXITED}
                pending.event.set()
        if pending.event.wait(timeout) and pending.reply is not None and retry \
                and pending.reply.get("message") == self._EXITED:
            # The zygote died as the request went out: the next request starts a new one.
            return self._request(message, fds, timeout, retry=False)
        if not pending.event.wait(timeout):
            self._pending.pop(message["id"], None)
            raise SandboxError(f"the sandbox zygote did not answer {message['op']} within {timeout}s")
        assert pending.reply is not None
        if pending.reply["op"] == "failed":
            raise SandboxError(f"could not {message['op']} a sandbox process: {pending.reply['message']}")
        return pending.reply

    def spawn(self, workdir: str, limits: dict[str, int | None], uid: int | None, gid: int | None) -> tuple[int, socket.socket]:
        """Fork a run process; returns its pid and the worker's end of its channel."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reply = self._request({"op": "spawn", "workdir": workdir, "limits": limits, "uid": uid, "gid": gid},
                                  [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        pid = reply["pid"]
        with self._exit_lock:
            self._exit_events.setdefault(pid, threading.Event())
        return pid, ours

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


@dataclass
class _Process:
    """A run process started ahead of its job, holding a slot (and so a uid)."""

    slot: int
    uid: int | None
    workdir: str
    pid: int | None = None
    sock: socket.socket | None = None
    pidfd: int | None = None  # signals reach this process even after its pid is reused

    def kill(self) -> None:
        """Kill the run process, and its process group when it has no uid of its own."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.uid is None and self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Sandbox:
    """Runs jobs in sandboxed processes forked from a zygote, one run per process.

    A few processes are started ahead of need (``prestart``), already under
    their limits and uid and waiting for a job, so a run costs one message on
    its critical path; the one it used is cleaned up and replaced afterwards.
    """

    def __init__(self, limits: SandboxLimits, slots: int, uid_base: int | None = None,
                 hard_grace_seconds: float = 5.0, max_seconds: float = 600.0, prestart: int = 2,
                 backend: str | Backend = "auto") -> None:
        try:
            self._backend = backend if isinstance(backend, Backend) else choose(backend)
        except ValueError as exc:
            raise SandboxError(str(exc)) from None
        self.limits = limits
        self.hard_grace_seconds = hard_grace_seconds
        self.max_seconds = max_seconds
        self.prestart = prestart
        # As root, each slot runs under its own uid, so RLIMIT_NPROC counts one
        # run's processes and a run's leftovers can be killed by uid.
        self._uid_lock: int | None = None
        self._uid_count = slots + prestart
        self._uid_base = self._claim_uids(uid_base, slots + prestart) if uid_base is not None and os.geteuid() == 0 else None
        self._slots: queue.LifoQueue[int] = queue.LifoQueue()
        for slot in reversed(range(slots + prestart)):
            self._slots.put(slot)
        self._root = tempfile.mkdtemp(prefix="flowpool-sandbox-")
        os.chmod(self._root, 0o711)
        self._zygote = Zygote(backend=self._backend)
        self._runs = itertools.count(1)
        self._ready: queue.SimpleQueue[_Process] = queue.SimpleQueue()
        # Cleaning up after a run (killing leftovers, removing files) happens
        # off the caller's path; the slot, and so its uid, is reused only after.
        self._cleanup: queue.Queue[_Process | None] = queue.Queue()
        self._cleaner = threading.Thread(target=self._clean, name="flowpool-sandbox-cleaner", daemon=True)

    @property
    def backend(self) -> str:
        """The isolation backend in force: bwrap or process."""
        return self._backend.name

    @property
    def backend_note(self) -> str:
        """Why this backend: the bwrap binary used, or why bwrap was passed over."""
        return self._backend.note

    @property
    def isolation(self) -> dict[str, Any]:
        """What the zygote reported of the isolation it achieved."""
        return dict(self._zygote.isolation)

    @property
    def weaknesses(self) -> list[str]:
        """Warnings about isolation missing here (empty when nothing is)."""
        return [part for part in self._findings() if part.startswith("WARNING")]

    def describe(self) -> str:
        """The isolation in force, in a line for people."""
        return "; ".join([f"{self.backend} backend", *self._findings()])

    def _findings(self) -> list[str]:
        uids = f"uids {self.uid_range.start}-{self.uid_range.stop - 1}" if self.uid_range else \
            "WARNING: runs share the worker's uid (start workers as root for a uid per slot)"
        return [uids, *(self._zygote.findings() if self._zygote.isolation else ["zygote not started"])]

    @property
    def uid_range(self) -> range | None:
        """The uids this sandbox's runs use (None when not started as root)."""
        if self._uid_base is None:
            return None
        # Not the free-slot count: that shrinks while runs hold their slots.
        return range(self._uid_base, self._uid_base + self._uid_count)

    def _claim_uids(self, base: int, count: int) -> int:
        """A block of ``count`` uids no other worker on this host uses, held by a file lock.

        Runs are cleaned up by killing every process of their uid, so two
        workers on one host (or one pid namespace) must never share a uid. The
        lock dies with the process, so a crashed worker's block is free again.
        """
        directory = os.path.join(tempfile.gettempdir(), "flowpool-uid-blocks")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        block_size = max(count, 1000)
        for block in range(64):
            fd = os.open(os.path.join(directory, f"{base}-{block}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._uid_lock = fd
            return base + block * block_size
        raise SandboxError(f"no free block of {block_size} sandbox uids from {base}: 64 workers on this host already")

    def start(self) -> None:
        self._zygote.start()
        self._cleaner.start()
        for _ in range(self.prestart):
            self._prestart()

    def stop(self) -> None:
        self._cleanup.put(None)
        if self._cleaner.is_alive():
            self._cleaner.join(10)
        self._zygote.stop()
        shutil.rmtree(self._root, ignore_errors=True)
        if self._uid_lock is not None:
            os.close(self._uid_lock)
            self._uid_lock = None

    def _spawn(self, slot: int, limits: SandboxLimits | None = None) -> _Process:
        """Start a run process in ``slot``, under every limit but the job's own CPU budget."""
        uid = self._uid_base + slot if self._uid_base is not None else None
        process = _Process(slot, uid, os.path.join(self._root, f"run-{next(self._runs)}"))
        try:
            process.pid, process.sock = self._zygote.spawn(process.workdir, self._process_limits(limits or self.limits),
                                                           uid, uid)
            process.pidfd = os.pidfd_open(process.pid)
        except BaseException:
            self._cleanup.put(process)
            raise
        return process

    def _prestart(self, slot: int | None = None) -> None:
        """Start a waiting process, in ``slot`` or a free one."""
        if slot is None:
            try:
                slot = self._slots.get_nowait()
            except queue.Empty:
                return  # every slot is busy: the next run starts its own process
        try:
            self._ready.put(self._spawn(slot))
        except SandboxError:
            pass  # _spawn handed the slot to the cleaner

    def _clean(self) -> None:
        while True:
            process = self._cleanup.get()
            if process is None:
                break
            # The slot's next process sweeps the uid as it starts, so when one
            # is wanted anyway, the zygote forks once per run instead of twice.
            refill = self._ready.qsize() < self.prestart
            try:
                if process.pid is not None and self._zygote.isolation.get("namespaces"):
                    # Killed already: the end of the PID namespace it was init of takes everything the
                    # run started, and its files were a tmpfs of that namespace. Once it is gone, the
                    # slot (and so the uid) is free.
                    if process.pidfd is not None:
                        select.select([process.pidfd], [], [], 5.0)
                    self._zygote.forget(process.pid)
                elif process.pid is not None:
                    self._zygote.reap(process.pid, process.workdir, process.uid, process.uid, sweep=not refill)
                else:
                    shutil.rmtree(process.workdir, ignore_errors=True)
            except Exception:  # a lost zygote takes its processes with it
                shutil.rmtree(process.workdir, ignore_errors=True)
                refill = False
            process.close()
            if refill:
                self._prestart(process.slot)
            else:
                self._slots.put(process.slot)
        while not self._ready.empty():  # stopping: the zygote's end kills them
            process = self._ready.get_nowait()
            process.close()
            if process.sock is not None:
                process.sock.close()

    def _process_limits(self, limits: SandboxLimits) -> dict[str, int | None]:
        """The limits a run process is started under (the rest the supervisor enforces)."""
        # CPU time is lowered by the run to its own budget once it knows its job.
        backstop = int(self.max_seconds + self.hard_grace_seconds) + 1
        return {
            "memory_bytes": limits.memory_bytes,
            # Counted per uid: without a uid of its own a run would share the worker's count.
            "processes": limits.processes if self._uid_base is not None else None,
            "open_files": limits.open_files,
            "file_bytes": limits.file_bytes,
            "tmp_bytes": limits.tmp_bytes,
            "cpu_seconds": min(backstop, limits.cpu_seconds or backstop),
        }

    def _same_process_limits(self, limits: SandboxLimits) -> bool:
        """Whether a prestarted process (started under the sandbox's limits) suits a run under ``limits``."""
        return limits is self.limits or self._process_limits(limits) == self._process_limits(self.limits)

    def _take_ready(self) -> _Process | None:
        """A started process waiting for a job, passing over any that died meanwhile (with a lost zygote)."""
        while True:
            try:
                process = self._ready.get_nowait()
            except queue.Empty:
                return None
            # A pidfd reads as ready once its process has exited.
            if process.pidfd is None or not select.select([process.pidfd], [], [], 0)[0]:
                return process
            self._cleanup.put(process)

    def run(self, code: bytes, job: dict[str, Any], soft_seconds: float,
            on_emit: Callable[[str, Any], None] | None = None, source: str | None = None,
            gate: Callable[[], bool] | None = None, on_call: CallHandler | None = None,
            slot_timeout: float | None = None, cancel: threading.Event | None = None,
            on_idle: Callable[[], None] | None = None, limits: SandboxLimits | None = None) -> RunOutcome:
        """Run ``execute(ctx)`` of the compiled ``code`` for ``job``; never raises for the script's faults.

        ``gate`` is called once the job is handed over, so the caller's own
        bookkeeping overlaps the run's start; when it returns False the run is
        killed before anything it sent is read, and the outcome is ``skipped``.
        ``limits`` replaces the sandbox's own for this run (a workflow's
        overrides); a run whose process limits differ gets a process of its
        own instead of a prestarted one.
        """
        limits = limits or self.limits
        outcome = RunOutcome()
        process: _Process | None = None
        try:
            process = self._take_ready() if self._same_process_limits(limits) else None
            if process is None:
                try:
                    process = self._spawn(self._slots.get(timeout=slot_timeout), limits)
                except queue.Empty:
                    raise SandboxError(f"no free sandbox slot within {slot_timeout:g}s") from None
            assert process.pid is not None and process.sock is not None
            outcome.pid = process.pid
            started = time.monotonic()
            hard_deadline = started + soft_seconds + self.hard_grace_seconds
            channel = Channel(process.sock, max_frame=limits.max_result_bytes + (64 << 10))
            # CPU time is a backstop for the hard limit, in whole seconds, and the workflow's own limit.
            cpu = int(soft_seconds + self.hard_grace_seconds) + 1
            try:
                channel.send({"op": "run", "code": base64.b64encode(code).decode(), "source": source, "job": job,
                              "soft_seconds": soft_seconds, "cpu_seconds": min(cpu, limits.cpu_seconds or cpu)})
                if gate is not None and not gate():
                    outcome.skipped = True
                    return outcome
                self._supervise(channel, process, hard_deadline, soft_seconds, started, outcome, on_emit, on_call,
                                cancel, on_idle, limits)
            except OSError as exc:  # the process died before it took the job
                outcome.error = self._crash(process) if isinstance(exc, BrokenPipeError) else SandboxError(
                    f"could not hand the job to the sandbox process: {exc}")
            finally:
                channel.close()
        except SandboxError as exc:
            outcome.error = exc
        finally:
            if process is not None:
                process.kill()
                self._cleanup.put(process)
        return outcome

    def _supervise(self, channel: Channel, process: _Process, hard_deadline: float, soft_seconds: float,
                   started: float, outcome: RunOutcome, on_emit: Callable[[str, Any], None] | None,
                   on_call: CallHandler | None = None, cancel: threading.Event | None = None,
                   on_idle: Callable[[], None] | None = None, limits: SandboxLimits | None = None) -> None:
        limits = limits or self.limits
        log_bytes = 0
        emitted = False
        while True:
            # on_idle runs once the run has nothing more to send right now, so
            # a burst of emits is handed on in one batch.
            if emitted and on_idle is not None and not select.select([channel.sock], [], [], 0)[0]:
                on_idle()
                emitted = False
            if cancel is not None and cancel.is_set():
                process.kill()
                outcome.error = Cancelled("the caller went away and asked for the run to be cancelled")
                return
            remaining = hard_deadline - time.monotonic()
            if remaining <= 0:
                process.kill()
                outcome.error = TimeLimitExceeded(
                    f"the run passed its hard time limit ({soft_seconds + self.hard_grace_seconds:g}s) and was killed",
                    limit="hard", seconds=soft_seconds)
                return
            # With a cancel event, wake up now and then to look at it.
            channel.sock.settimeout(min(remaining, 0.25) if cancel is not None else remaining)
            try:
                message = channel.recv()
            except socket.timeout:
                continue
            except ChannelClosed:
                outcome.error = self._crash(process)
                return
            except ProtocolError as exc:
                process.kill()
                if "over the limit" in str(exc):
                    outcome.error = ResultTooLarge(
                        f"the run sent a message over the size limit ({limits.max_result_bytes} bytes for a result)")
                else:
                    outcome.error = SandboxError(f"the run broke the sandbox protocol: {exc}")
                return
            op = message["op"]
            if op == "call":
                try:
                    self._answer_call(channel, message, on_call, started + soft_seconds, hard_deadline)
                except (OSError, socket.timeout):
                    continue  # the run died or stopped reading: the next recv or the deadline says which
                continue
            if op == "emit":
                outcome.chunks += 1
                if outcome.chunks > limits.max_chunks:
                    process.kill()
                    outcome.error = ResultTooLarge(f"the run emitted more than {limits.max_chunks} chunks")
                    return
                if len(json.dumps(message.get("content"))) > limits.max_chunk_bytes:
                    process.kill()
                    outcome.error = ResultTooLarge(f"an emitted chunk is over {limits.max_chunk_bytes} bytes")
                    return
                if on_emit is not None:
                    on_emit(str(message.get("type")), message.get("content"))
                    emitted = True
            elif op == "log":
                if outcome.logs_truncated:
                    continue
                line = {"level": str(message.get("level", "info")), "msg": str(message.get("msg", "")),
                        "time": time.time()}
                if isinstance(message.get("fields"), dict) and message["fields"]:
                    line["fields"] = message["fields"]
                log_bytes += len(line["msg"]) + 40
                if log_bytes > limits.max_log_bytes:
                    outcome.logs_truncated = True
                    outcome.logs.append({"level": "warning", "msg": f"log cut at {limits.max_log_bytes} bytes",
                                         "time": time.time()})
                else:
                    outcome.logs.append(line)
            elif op == "result":
                outcome.result = message.get("value")
                outcome.result_json = json.dumps(outcome.result, separators=(",", ":"), ensure_ascii=False)
                if len(outcome.result_json.encode()) > limits.max_result_bytes:
                    outcome.result = outcome.result_json = None
                    outcome.error = ResultTooLarge(f"the result is over {limits.max_result_bytes} bytes")
                elif time.monotonic() - started > soft_seconds:
                    outcome.result = outcome.result_json = None
                    outcome.error = TimeLimitExceeded(
                        f"the run passed its soft time limit ({soft_seconds:g}s)", limit="soft", seconds=soft_seconds)
                return
            elif op == "error":
                kind = message.get("kind")
                if kind == "timeout" or time.monotonic() - started > soft_seconds:
                    # Past the soft limit whatever failed is the limit's doing (a cleanup that raised, say).
                    outcome.error = TimeLimitExceeded(
                        f"the run passed its soft time limit ({soft_seconds:g}s) and was interrupted",
                        limit="soft", seconds=soft_seconds)
                else:
                    outcome.error = ScriptError(str(message.get("message", "the script failed")),
                                                exception=str(message.get("type", "")),
                                                traceback=str(message.get("traceback", ""))[-8192:])
                return
            else:
                process.kill()
                outcome.error = SandboxError(f"the run sent an unknown message {op!r}")
                return

    @staticmethod
    def _answer_call(channel: Channel, message: dict[str, Any], on_call: CallHandler | None,
                     soft_deadline: float, hard_deadline: float) -> None:
        """Serve one ctx call of the run: a reply, or chunks then an end, or an error."""
        call_id = message.get("id")
        try:
            if on_call is None:
                raise CallFailed("unsupported", "this worker serves no ctx calls")
            method, params = message.get("method"), message.get("params")
            if not isinstance(method, str) or not isinstance(params, dict):
                raise CallFailed("invalid", "a ctx call needs a method name and a params object")
            value = on_call(method, params, soft_deadline)
            if isinstance(value, Streamed):
                for chunk in value.chunks:
                    channel.sock.settimeout(max(0.01, hard_deadline - time.monotonic()))
                    channel.send({"op": "chunk", "id": call_id, "value": chunk})
                channel.send({"op": "reply", "id": call_id, "end": True})
            else:
                channel.send({"op": "reply", "id": call_id, "value": value})
        except CallFailed as exc:
            kind = exc.kind
            if time.monotonic() >= soft_deadline:
                # The call failed because the run's budget ran out (its own alarm may not have rung yet):
                # the script sees the soft limit, not a model or HTTP error it might not expect.
                kind = "timeout"
            channel.send({"op": "reply", "id": call_id, "error": {"kind": kind, "message": exc.message}})

    def _crash(self, process: _Process) -> SandboxError:
        assert process.pid is not None
        status = self._zygote.wait_exit(process.pid, 2.0)
        if status is None:
            process.kill()
            return SandboxError("the sandbox process closed its channel without a result")
        if "signal" in status:
            sig = status["signal"]
            hint = _SIGNAL_HINTS.get(sig, "")
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            return SandboxError(f"the sandbox process died from signal {name}" + (f" ({hint})" if hint else ""),
                                signal=sig)
        return SandboxError(f"the sandbox process exited with code {status['code']} without a result",
                            exit_code=status["code"])
