"""Run processes kept warm after a clean run, for the next run of the same key (FLOWPOOL_SANDBOX_REUSE).

A key is the account, the workflow version (its content hash and the
configuration that enters the sandbox with it) and the run's limits: a
process serves only runs of the key its first run had, so nothing of one
account reaches another. The sandbox offers a process here only after a run
that ended with a result or the script's own error and that carried no
secrets. The worker alone decides whether to keep it, from the kernel's view
of it, never from what the process says (its code is the script's to change):

* the process answered, then tidied up (:mod:`.reuse`) and said ``ready``
  within ``ready_seconds``;
* the worker stopped it (SIGSTOP stops every thread), then found from
  ``/proc``: one thread, no children, nothing in its PID namespace but it
  and its init, with cgroups nothing else in its slot, nothing unread on its
  channel (:func:`freeze`).

It then waits stopped, holding its slot (its uid and cgroup): nothing of it
runs while parked. Taken for a run, it must still be stopped with nothing
unread, and its CPU time used so far plus the run's budget must stay under
the CPU hard limit it was started with (RLIMIT_CPU counts a process's whole
life), so each run gets its whole budget (:func:`thaw`); then it is
continued. A process is retired (killed) on any doubt, after ``max_runs``
runs, after ``idle_seconds`` without one, when a run of another key needs its
slot (least recently used first), and when the worker stops.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import struct
import threading
import time
from typing import Callable, Hashable

from .linux import children, readable, stat_fields
from .run_process import RunProcess

__all__ = ["CPU_SLACK", "READY_SECONDS", "SETTLING_WAIT", "TIDY_CPU", "WarmPool", "answered", "freeze", "thaw"]

READY_SECONDS = 2.0  # how long a run process may tidy up after its answer before it is retired instead
# How long a run waits for a process of its key that is still tidying up, rather than start a fresh one: the
# next run of a version often comes as the last one answers.
SETTLING_WAIT = 0.2
STOP_SECONDS = 1.0  # how long SIGSTOP may take to stop a process (it is immediate but for one in the kernel)
# CPU seconds of slack between the worker's reading of a process's CPU time and the run's own, which rounds it up.
CPU_SLACK = 1.25
# CPU seconds a run process may use between its answer and its stop (the runtime's tidying takes milliseconds):
# past it, it computed after its answer, uncharged, and is not kept.
TIDY_CPU = 0.2
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_READY = struct.pack(">I", len(b'{"op":"ready"}')) + b'{"op":"ready"}'  # the frame the runtime sends (Channel.send)


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(b"Threads:"))


def _stopped(pid: int) -> bool:
    return stat_fields(pid)[0] in ("T", "t")


def cpu_used(pid: int) -> float:
    """CPU seconds ``pid`` used itself, all its threads (what RLIMIT_CPU counts), from /proc."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _cpu_hard(pid: int) -> float | None:
    """The hard RLIMIT_CPU of ``pid`` in seconds (None: unlimited), from /proc: the script may have lowered it."""
    with open(f"/proc/{pid}/limits") as handle:
        hard = next(line for line in handle if line.startswith("Max cpu time")).split()[4]
    return None if hard == "unlimited" else float(hard)


def _spent(process: RunProcess) -> float:
    """CPU seconds of the run and its init, with the children they waited for (every process the namespace had)."""
    assert process.pid is not None and process.run_pid is not None
    return sum(sum(int(value) for value in stat_fields(pid)[11:15])
               for pid in (process.pid, process.run_pid)) / _CLOCK_TICKS


def _ns_pid(pid: int) -> int:
    """The pid of ``pid`` in its own (innermost) PID namespace."""
    with open(f"/proc/{pid}/status", "rb") as handle:
        return int(next(line for line in handle if line.startswith(b"NSpid:")).split()[-1])


def hold(process: RunProcess) -> bool:
    """Find the run process under the init of ``process`` and hold it by a pidfd (once); False when it is not there.

    Each pid read from /proc is checked through a pidfd opened before the
    check: init alive (so its children are its own), then the child alive,
    init's child and pid 2 of the namespace (the run, not a process the run
    started and left to init), so a reused pid is never taken for the run.
    """
    assert process.pid is not None and process.pidfd is not None
    if process.run_pidfd is not None:
        return not readable(process.run_pidfd)
    try:
        if readable(process.pidfd):
            return False
        found = children(process.pid)
        if len(found) != 1:
            return False
        pidfd = os.pidfd_open(found[0])
        try:
            if not readable(pidfd) and int(stat_fields(found[0])[1]) == process.pid and _ns_pid(found[0]) == 2:
                process.run_pid, process.run_pidfd = found[0], pidfd
                return True
        except (OSError, ValueError, StopIteration, IndexError):
            pass
        os.close(pidfd)  # not the run: never held, so never signalled
    except (OSError, ValueError, StopIteration, IndexError):
        pass
    return False


def room(process: RunProcess, cpu_seconds: int) -> bool:
    """Whether the held run process's hard CPU limit (RLIMIT_CPU counts its whole life) leaves a run of
    ``cpu_seconds`` its whole budget past what it used so far."""
    assert process.run_pid is not None
    hard = _cpu_hard(process.run_pid)
    return hard is None or cpu_used(process.run_pid) + cpu_seconds + CPU_SLACK <= hard


def answered(process: RunProcess, cpu_seconds: int) -> bool:
    """Note the CPU time of a run process that just answered (:func:`freeze` compares); False when it cannot be
    kept: not found (:func:`hold`), or no room for another run of ``cpu_seconds``."""
    try:
        if not (hold(process) and room(process, cpu_seconds)):
            return False
        process.cpu_answered = _spent(process)
        return True
    except (OSError, ValueError, StopIteration, IndexError):
        return False


def freeze(process: RunProcess, members: Callable[[], list[int]] | None) -> bool:
    """Stop the run process of ``process`` (held by :func:`answered`), then whether it may be kept.

    ``members``: the pids in the slot's cgroups, where there are cgroups.
    Anything but exactly the stopped run alone, one thread, under its init,
    with nothing unread on its channel, having used no more than
    ``TIDY_CPU`` since its answer, answers False (the caller retires it; the
    run is killed).
    """
    assert process.pid is not None and process.pidfd is not None and process.sock is not None
    if process.run_pidfd is None or process.run_pid is None:
        return False
    init, run = process.pid, process.run_pid
    try:
        signal.pidfd_send_signal(process.run_pidfd, signal.SIGSTOP)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + STOP_SECONDS
        while not _stopped(run):
            if time.monotonic() > deadline:
                return _kill(process)
            time.sleep(0.0005)
        # Stopped, it starts nothing more: what /proc shows now stays so until it is continued. A process that
        # computed after its answer (serving itself the next run, say) did so uncharged: never kept.
        if (_threads(run) == 1 and not children(run) and children(init) == [run]
                and (members is None or sorted(members()) == sorted([init, run]))
                and not readable(process.sock.fileno()) and _spent(process) - process.cpu_answered <= TIDY_CPU
                and not readable(process.run_pidfd) and not readable(process.pidfd)):
            return True  # both alive still: the /proc reads above were theirs
    except (OSError, ValueError, StopIteration, IndexError):
        pass
    return _kill(process)


def _kill(process: RunProcess) -> bool:
    """Kill a run process stopped and not kept, through its pidfd; False."""
    try:
        assert process.run_pidfd is not None
        signal.pidfd_send_signal(process.run_pidfd, signal.SIGKILL)
    except OSError:
        pass
    return False


def thaw(process: RunProcess, cpu_seconds: int) -> bool:
    """Continue a parked process for a run of ``cpu_seconds`` CPU time; False (retire it) when it may not serve it.

    It must be alive (its pidfd says so, not its pid) and stopped still, with
    nothing unread on its channel, and its hard CPU limit, as it is now, must
    leave room for the whole budget past what it used so far.
    """
    assert process.sock is not None and process.run_pid is not None and process.run_pidfd is not None
    try:
        if readable(process.run_pidfd) or not _stopped(process.run_pid) or readable(process.sock.fileno()):
            return False
        if not room(process, cpu_seconds):
            return False
        signal.pidfd_send_signal(process.run_pidfd, signal.SIGCONT)
        return True
    except (OSError, ValueError, StopIteration, IndexError):
        return False


class WarmPool:
    """The idle warm processes of one sandbox, least recently used first, and those about to be; thread-safe.

    ``admit`` checks a process that said ``ready`` (stopping it: :func:`freeze`);
    ``retire`` ends one that will serve no more runs.
    """

    def __init__(self, max_runs: int, idle_seconds: float, admit: Callable[[RunProcess], bool],
                 retire: Callable[[RunProcess], None], ready_seconds: float = READY_SECONDS) -> None:
        self.max_runs = max_runs
        self.idle_seconds = idle_seconds
        self.ready_seconds = ready_seconds
        self._admit, self._retire = admit, retire
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified whenever a settling process is parked or not
        self._idle: list[RunProcess] = []
        self._settling: dict[int, tuple[RunProcess, float]] = {}  # socket fd -> process, deadline for "ready"
        self._partial: dict[int, bytes] = {}  # socket fd -> the part of "ready" read so far (the settler's alone)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._settler = threading.Thread(target=self._settle_all, name="flowpool-sandbox-settler", daemon=True)
        self._settler.start()

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, key: Hashable, wait: float = SETTLING_WAIT) -> RunProcess | None:
        """The most recently parked process of ``key``, no longer idle; None when there is none.

        While none is idle but one of ``key`` is settling, waits up to ``wait`` seconds for it.
        """
        deadline = time.monotonic() + wait
        with self._lock:
            while True:
                for index in range(len(self._idle) - 1, -1, -1):
                    if self._idle[index].key == key:
                        return self._idle.pop(index)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(p.key == key for p, _ in self._settling.values()):
                    return None
                self._settled.wait(remaining)

    def settle(self, process: RunProcess) -> None:
        """Park ``process`` (its key set) once it says ``ready`` and ``admit`` keeps it; else retire it.

        Off the caller's path: the run's answer is not held up by its tidying.
        """
        assert process.sock is not None
        with self._lock:
            if not self._closed:
                self._settling[process.sock.fileno()] = (process, time.monotonic() + self.ready_seconds)
                self._wake()
                return
        self._retire(process)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the settler wakes anyway

    def _settle_all(self) -> None:
        """The settler thread: wait for each settling process's ``ready``, within its deadline."""
        while True:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                late = [fd for fd, (_, deadline) in self._settling.items() if deadline <= now]
                done = [self._settling.pop(fd)[0] for fd in late]
                for fd in late:
                    self._partial.pop(fd, None)
                for fd in self._settling:
                    poller.register(fd, select.POLLIN)
                wait = min([deadline - now for _, deadline in self._settling.values()], default=None)
            for process in done:
                self._retire(process)
            if done:
                with self._lock:
                    self._settled.notify_all()
            for fd, _ in poller.poll(None if wait is None else max(1, int(wait * 1000))):
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    entry = self._settling.get(fd)
                if entry is not None:
                    self._settle_one(fd, *entry)

    def _settle_one(self, fd: int, process: RunProcess, deadline: float) -> None:
        """Read what a settling process sent, without waiting; park or retire it once it is a whole frame.

        Never blocks: the settler serves every slot, and a process that sends
        part of a frame only waits, alone, for its own deadline.
        """
        assert process.sock is not None
        try:
            got = process.sock.recv(len(_READY) + 1, socket.MSG_DONTWAIT)  # one more: a longer frame is no "ready"
        except BlockingIOError:
            return
        except OSError:
            got = b""
        frame = self._partial.pop(fd, b"") + got
        if got and len(frame) < len(_READY) and _READY.startswith(frame):
            self._partial[fd] = frame  # part of it: the rest comes later, or the process's deadline retires it
            return
        ready = frame == _READY  # the runtime's frame exactly; anything else, or more, is no "ready"
        kept = ready and self._admit(process)
        with self._lock:
            # Settling till now: a run that waits for it (take) sees it go from settling to idle at once.
            entry = self._settling.get(fd)
            if entry is None or entry[0] is not process:
                return  # the pool closed meanwhile and took it
            del self._settling[fd]
            if kept:
                process.idle_since = time.monotonic()
                self._idle.append(process)
            self._settled.notify_all()
        if not kept:
            self._retire(process)

    def park(self, process: RunProcess) -> bool:
        """Keep ``process`` (its key set, stopped) waiting for its next run; False once the pool is closed."""
        with self._lock:
            if self._closed:
                return False
            process.idle_since = time.monotonic()
            self._idle.append(process)
            self._settled.notify_all()
            return True

    def evict(self) -> RunProcess | None:
        """The least recently used idle process, taken out to be retired (its slot is wanted); None if none."""
        with self._lock:
            return self._idle.pop(0) if self._idle else None

    def expired(self, now: float) -> list[RunProcess]:
        """The processes idle for ``idle_seconds`` or more, taken out to be retired."""
        with self._lock:
            old = [p for p in self._idle if now - p.idle_since >= self.idle_seconds]
            self._idle = [p for p in self._idle if now - p.idle_since < self.idle_seconds]
        return old

    def close(self) -> list[RunProcess]:
        """Stop keeping processes: every idle or settling one, taken out (the sandbox is stopping)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            idle += [process for process, _ in self._settling.values()]
            self._settling.clear()
            self._settled.notify_all()
            self._wake()
        self._settler.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        return idle
