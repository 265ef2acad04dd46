"""What a warm run process puts back between two runs, and how it tells that it cannot be kept.

A run process the worker keeps (:mod:`.warm`) serves the next run of the
same workflow version of the same account. Before it says it may be kept, the
run's end is checked here, from inside the process: only the run's own thread
is left, no other process lives in its PID namespace, no System V IPC object
remains in its IPC namespace, it holds no descriptor it did not hold before
its first run (an accessory left open, say) and those it held are still the
same files, its resource limits are as they were; then its private ``/tmp``
is emptied, its working directory, umask, signal handlers and mask, and
interval timers are put back. Any doubt answers False, and the worker retires
the process. Module state (the script's globals, what it imported) stays, as
documented: a warm process is the workflow version's own.

Imported by the run process's runtime, before the zygote covers flowpool's
code: stdlib only.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal

__all__ = ["Baseline"]

_LIMITS = (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE,
           resource.RLIMIT_CORE)
_TIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
_IPC = ("/proc/sysvipc/shm", "/proc/sysvipc/msg", "/proc/sysvipc/sem")


def _open_files() -> dict[int, tuple[int, int]]:
    """This process's open descriptors, each with the (device, inode) of what it refers to."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.fstat(int(name))
        except OSError:
            continue  # the directory's own descriptor, closed once listed
        found[int(name)] = (info.st_dev, info.st_ino)
    return found


def _entries(directory: str) -> dict[str, int]:
    """The names in ``directory`` and their inodes."""
    with os.scandir(directory) as entries:
        return {entry.name: entry.inode() for entry in entries}


def _ipc_objects() -> bool:
    """Whether the IPC namespace holds any System V shared memory, message queue or semaphore set."""
    for path in _IPC:
        try:
            with open(path) as handle:
                if len(handle.readlines()) > 1:  # a header line, then one per object
                    return True
        except OSError:
            return True  # cannot tell: assume the worst
    return False


class Baseline:
    """The state of a run process before its first run; :meth:`restore` checks and puts it back after each run."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cwd = os.getcwd()
        self.tmp = _entries(self.cwd)  # the run's private tmpfs: what is there before any run (kept runtime paths)
        self.files = _open_files()
        self.limits = {which: resource.getrlimit(which) for which in _LIMITS}
        self.cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        self.handlers = {sig: signal.getsignal(sig) for sig in signal.valid_signals()
                         if sig not in (signal.SIGKILL, signal.SIGSTOP)}
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def restore(self) -> bool:
        """Whether this process may serve another run, having put back what a run may change."""
        try:
            return self._alone() and self._same_files() and self._same_limits() and self._reset()
        except (OSError, ValueError, RuntimeError):
            return False

    def _alone(self) -> bool:
        """Only this thread in this process, and only this process and its init in the PID namespace."""
        if len(os.listdir("/proc/self/task")) != 1:
            return False
        while True:  # children the script started and that ended, unwaited for, are collected here
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                return False  # a child still running
        others = [name for name in os.listdir("/proc") if name.isdigit() and int(name) not in (1, self.pid)]
        return not others and not _ipc_objects()

    def _same_files(self) -> bool:
        """The descriptors held before the first run, the same files still, and no other."""
        return _open_files() == self.files

    def _same_limits(self) -> bool:
        return self.limits == {which: resource.getrlimit(which) for which in _LIMITS} and \
            resource.getrlimit(resource.RLIMIT_CPU)[1] == self.cpu_hard

    def _reset(self) -> bool:
        """Empty the private /tmp, and put back the working directory, umask, signals and timers."""
        os.chdir(self.cwd)
        os.umask(0o077)
        for timer in _TIMERS:
            signal.setitimer(timer, 0)
        for sig, handler in self.handlers.items():
            if handler is not None and signal.getsignal(sig) != handler:
                signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        for name, inode in _entries(self.cwd).items():
            if self.tmp.get(name) == inode:
                continue
            path = os.path.join(self.cwd, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)  # raises OSError for what it cannot remove: then the process is not kept
            else:
                os.unlink(path)
        return _entries(self.cwd) == self.tmp
