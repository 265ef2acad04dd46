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
import threading
import time
from typing import Callable, Hashable

from .channel import Channel
from .linux import readable, stat_fields
from .run_process import RunProcess

__all__ = ["CPU_SLACK", "READY_SECONDS", "SETTLING_WAIT", "WarmPool", "freeze", "thaw"]

READY_SECONDS = 2.0  # how long a run process may tidy up after its answer before it is retired instead
# How long a run waits for a process of its key that is still tidying up, rather than start a fresh one: the
# next run of a version often comes as the last one answers.
SETTLING_WAIT = 0.2
STOP_SECONDS = 1.0  # how long SIGSTOP may take to stop a process (it is immediate but for one in the kernel)
# CPU seconds of slack between the worker's reading of a process's CPU time and the run's own, which rounds it up.
CPU_SLACK = 1.25
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The children of every thread of ``pid``, from /proc."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(child) for child in handle.read().split()]
    return found


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(b"Threads:"))


def _stopped(pid: int) -> bool:
    return stat_fields(pid)[0] in ("T", "t")


def cpu_used(pid: int) -> float:
    """CPU seconds ``pid`` used itself, all its threads (what RLIMIT_CPU counts), from /proc."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def freeze(process: RunProcess, members: Callable[[], list[int]] | None) -> bool:
    """Stop the run process of ``process`` (the child of its namespace's init), then whether it may be kept.

    ``members``: the pids in the slot's cgroups, where there are cgroups.
    Anything but exactly the stopped run alone, one thread, under its init,
    with nothing unread on its channel, answers False (the caller retires it).
    """
    assert process.pid is not None and process.sock is not None
    init = process.pid
    try:
        if process.run_pidfd is None:
            found = _children(init)
            if len(found) != 1:
                return False
            pidfd = os.pidfd_open(found[0])
            process.run_pid, process.run_pidfd = found[0], pidfd
            if int(stat_fields(found[0])[1]) != init:  # the pid is the run's still, now that the pidfd holds it
                return False
        run = process.run_pid
        assert run is not None
        signal.pidfd_send_signal(process.run_pidfd, signal.SIGSTOP)
        deadline = time.monotonic() + STOP_SECONDS
        while not _stopped(run):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        # Stopped, it starts nothing more: what /proc shows now stays so until it is continued.
        return (_threads(run) == 1 and not _children(run) and _children(init) == [run]
                and (members is None or sorted(members()) == sorted([init, run]))
                and not readable(process.sock.fileno()))
    except (OSError, ValueError, StopIteration, IndexError):
        return False


def thaw(process: RunProcess, cpu_seconds: int) -> bool:
    """Continue a parked process for a run of ``cpu_seconds`` CPU time; False (retire it) when it may not serve it.

    It must be stopped still, with nothing unread on its channel, and its hard
    CPU limit must leave room for the whole budget past what it used so far.
    """
    assert process.sock is not None and process.run_pid is not None and process.run_pidfd is not None
    try:
        if not _stopped(process.run_pid) or readable(process.sock.fileno()):
            return False
        if process.cpu_hard is not None and cpu_used(process.run_pid) + cpu_seconds + CPU_SLACK > process.cpu_hard:
            return False
        signal.pidfd_send_signal(process.run_pidfd, signal.SIGCONT)
        return True
    except (OSError, ValueError, IndexError):
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
        """Park or retire one settling process whose channel has something to read."""
        assert process.sock is not None
        try:
            process.sock.settimeout(max(0.01, deadline - time.monotonic()))
            ready = Channel(process.sock, max_frame=64).recv() == {"op": "ready"}
            process.sock.settimeout(None)
        except (OSError, ValueError, EOFError):
            ready = False
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
