"""What a warm run process puts back between two runs: tidying, not the check that keeps it.

A run process the worker keeps (:mod:`.warm`) serves the next run of the
same workflow version of the same account. This code runs in the script's
own interpreter, so a script can change it (patch :meth:`Baseline.restore`,
say): the worker never trusts it. The worker decides alone, from the
kernel's view of the process once it has stopped it (:func:`.warm.freeze`).
What is done here is tidying for a script that did not mean harm: it gives
up (and the process exits) when more than the run's own thread is left,
another process lives in its PID namespace, a System V IPC object remains,
it holds a descriptor it did not hold before its first run (an accessory
left open, say) or one it held is another file or has other flags (a channel
made non-blocking), or a resource limit or a signal handler it cannot put
back changed; otherwise it empties its private ``/tmp``, and puts back its
working directory, umask, signal handlers and mask (discarding pending
signals), the signal wakeup descriptor and interval timers. Module state (the
script's globals, what it imported) stays, as documented: a warm process is
the workflow version's own.

Imported by the run process's runtime, before the zygote covers flowpool's
code: stdlib only.
"""
from __future__ import annotations

import fcntl
import os
import resource
import shutil
import signal

__all__ = ["Baseline"]

# Every limit but CPU time (its soft limit moves run by run: runtime._allow_cpu): STACK, DATA, MEMLOCK,
# MSGQUEUE, SIGPENDING... as much as AS or NOFILE.
_LIMITS = tuple(getattr(resource, name) for name in sorted(dir(resource))
                if name.startswith("RLIMIT_") and name != "RLIMIT_CPU")
_TIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
_IPC = ("/proc/sysvipc/shm", "/proc/sysvipc/msg", "/proc/sysvipc/sem")


def _open_files() -> dict[int, tuple[int, int, int, int]]:
    """This process's open descriptors, each with the (device, inode) of what it refers to and its flags."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.fstat(int(name))
        except OSError:
            continue  # the directory's own descriptor, closed once listed
        fd = int(name)
        found[fd] = (info.st_dev, info.st_ino, fcntl.fcntl(fd, fcntl.F_GETFL), fcntl.fcntl(fd, fcntl.F_GETFD))
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
    """The state of a run process before its first run; :meth:`restore` puts it back after each run (tidying:
    the worker's own checks decide whether the process is kept)."""

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
        """Put back what a run may change; False when it cannot (the process then exits). Not a security check."""
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
        signal.set_wakeup_fd(-1)  # the runtime sets none: a script's would get the next run's signals
        for sig in signal.sigpending():  # blocked and pending: ignoring a signal discards it (POSIX)
            signal.signal(sig, signal.SIG_IGN)
        for sig, handler in self.handlers.items():
            current = signal.getsignal(sig)
            if handler is None:
                if current is not None:
                    return False  # set outside Python before the first run: nothing to put back from here
            elif current != handler:
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
