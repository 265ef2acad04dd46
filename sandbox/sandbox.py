"""The sandbox a worker runs jobs in: slots and their uids, run processes started ahead of need, clean-up.

Each run gets a process of its own, forked by the zygote (:mod:`.zygote`,
reached through :mod:`.zygote_client`) under the backend :mod:`.backends`
chooses (or, with reuse on, one kept warm by an earlier run of the same
workflow version of the same account: :mod:`.warm`), and is followed by a :class:`~.session.RunSession`, which enforces
its time limits; whatever the run left behind dies with its PID namespace
(or, without one, with its uid). A call of :meth:`Sandbox.run` blocks one
worker thread on a socket, so a thread pool holds many runs waiting on slow
model calls.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import queue
import resource
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Hashable

from flowpool.errors import SandboxError

from .backends import Backend, choose
from .containment import Containment
from .linux import readable
from .protocol import CallHandler, RunOutcome, SandboxLimits, cpu_budget
from .run_process import RunProcess
from .session import RunSession, StopRequest
from .warm import WarmPool, answered, freeze, thaw
from .zygote_client import Zygote

__all__ = ["Sandbox"]


def _allow_open_files() -> None:
    """Raise this process's soft limit of open files to its hard one.

    Each slot holds a few descriptors (its cgroup files, a waiting process's
    pidfd and channel): a worker of a few hundred slots passes the soft limit
    many hosts set (1024). Runs are not affected: each gets its own limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Sandbox:
    """Runs jobs in sandboxed processes forked from a zygote, one run per process.

    A few processes are started ahead of need (``prestart``), already under
    their limits and uid and waiting for a job, so a run costs one message on
    its critical path; the one it used is cleaned up and replaced afterwards.
    With ``reuse`` a process that ended a run cleanly may be kept warm for the
    next run of the same key instead (:mod:`.warm`).
    """

    def __init__(self, limits: SandboxLimits, slots: int, uid_base: int | None = None,
                 hard_grace_seconds: float = 5.0, max_seconds: float = 600.0, prestart: int = 2,
                 backend: str | Backend = "auto", cgroups: str = "auto", packages: str = "", reuse: bool = False,
                 reuse_max_runs: int = 1000, reuse_idle_seconds: float = 60.0) -> None:
        try:
            # ``packages``: the distributions scripts may import under bwrap (FLOWPOOL_SANDBOX_PACKAGES).
            self._backend = backend if isinstance(backend, Backend) else choose(backend, packages)
            # Bounds each run as a whole: a cgroup per slot (unless ``cgroups`` is off), else a watchdog.
            self._containment = Containment(slots + prestart, cgroups)
        except ValueError as exc:
            raise SandboxError(str(exc)) from None
        self.limits = limits
        self.hard_grace_seconds = hard_grace_seconds
        self.max_seconds = max_seconds
        self.prestart = prestart
        self._warm = WarmPool(reuse_max_runs, reuse_idle_seconds, self._admit, self._retire) if reuse else None
        # Runs waiting for a slot, and warm processes retired for theirs and not yet cleaned: one eviction per waiter.
        self._evict_lock = threading.Lock()
        self._waiting = self._evicting = 0
        # As root, each slot runs under its own uid, so RLIMIT_NPROC counts one
        # run's processes and a run's leftovers can be killed by uid.
        self._uid_lock: int | None = None
        self._uid_count = slots + prestart
        self._uid_base = self._claim_uids(uid_base, slots + prestart) if uid_base is not None and os.geteuid() == 0 else None
        self._own_process_limits = self._process_limits(limits)  # what prestarted processes start under
        self._slots: queue.LifoQueue[int] = queue.LifoQueue()
        for slot in reversed(range(slots + prestart)):
            self._slots.put(slot)
        self._root = tempfile.mkdtemp(prefix="flowpool-sandbox-")
        os.chmod(self._root, 0o711)
        self._zygote = Zygote(backend=self._backend)
        self._runs = itertools.count(1)
        self._ready: queue.SimpleQueue[RunProcess] = queue.SimpleQueue()
        # Cleaning up after a run (killing leftovers, removing files) happens
        # off the caller's path; the slot, and so its uid, is reused only after.
        self._cleanup: queue.Queue[RunProcess | None] = queue.Queue()
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

    @property
    def run_limits(self) -> str:
        """How the processes of each run are bounded together: by a cgroup per slot, or a watchdog."""
        return self._containment.describe()

    def describe(self) -> str:
        """The isolation in force, in a line for people."""
        return "; ".join([f"{self.backend} backend", *self._findings()])

    def _findings(self) -> list[str]:
        uids = f"uids {self.uid_range.start}-{self.uid_range.stop - 1}" if self.uid_range else \
            "WARNING: runs share the worker's uid (start workers as root for a uid per slot)"
        packages = [f"packages: {self._backend.packages}"] if self._backend.packages else []
        # Without bwrap a run sees /sys/fs/cgroup, and with the worker's uid it owns the slot's cgroup files.
        shared = ["WARNING: runs share the worker's uid and see its cgroups: a run could lift its own limits"] \
            if self.backend == "process" and self.uid_range is None and self._containment.cgroups is not None else []
        return [uids, *self._zygote.findings(), *packages, self.run_limits, *shared]

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
        """Make the slots' cgroups, start the zygote, the cleaner and the processes started ahead of need."""
        _allow_open_files()
        self._containment.start()  # first: on cgroup v2 the worker may move itself to a leaf cgroup
        self._zygote.start()
        self._cleaner.start()
        for _ in range(self.prestart):
            self._prestart()

    def stop(self) -> None:
        """Stop the zygote (and with it every run process), remove the runs' files and free the uids."""
        self._cleanup.put(None)
        if self._cleaner.is_alive():
            self._cleaner.join(10)
        self._zygote.stop()
        self._containment.stop()
        shutil.rmtree(self._root, ignore_errors=True)
        if self._uid_lock is not None:
            os.close(self._uid_lock)
            self._uid_lock = None

    def _spawn(self, slot: int, limits: SandboxLimits | None = None) -> RunProcess:
        """Start a run process in ``slot``, under every limit but the job's own CPU budget."""
        uid = self._uid_base + slot if self._uid_base is not None else None
        process = RunProcess(slot, uid, os.path.join(self._root, f"run-{next(self._runs)}"))
        limits = limits or self.limits
        process_limits = self._own_process_limits if limits is self.limits else self._process_limits(limits)
        try:
            try:
                cgroup_fds = self._containment.prepare(slot, limits, bool(self._zygote.isolation.get("namespaces")))
            except OSError as exc:
                raise SandboxError(f"could not set the run's cgroup limits: {exc}") from exc
            process.pid, process.sock, process.zygote = self._zygote.spawn(
                process.workdir, process_limits, uid, uid, cgroup_fds)
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
        # With warm processes it also wakes now and then to retire those idle too long.
        tick = None if self._warm is None else min(1.0, self._warm.idle_seconds / 4)
        while True:
            try:
                process = self._cleanup.get(timeout=tick)
            except queue.Empty:
                self._retire_idle()
                continue
            self._retire_idle()
            if process is None:
                break
            self._clean_one(process)
        while not self._ready.empty():  # stopping: the zygote's end kills them
            process = self._ready.get_nowait()
            process.close()
            if process.sock is not None:
                process.sock.close()
        for process in self._warm.close() if self._warm is not None else []:
            process.kill()
            process.close()
            if process.sock is not None:
                process.sock.close()

    def _retire_idle(self) -> None:
        """Retire the warm processes that waited FLOWPOOL_SANDBOX_REUSE_IDLE_SECONDS for a run."""
        if self._warm is not None:
            for idle in self._warm.expired(time.monotonic()):
                self._retire(idle)

    def _retire(self, process: RunProcess) -> None:
        """End a warm process that will serve no more runs, and hand it to the clean-up."""
        if process.sock is not None:
            process.sock.close()
        process.kill()
        self._cleanup.put(process)

    def _clean_one(self, process: RunProcess) -> None:
        """Clean up after a run process that is gone or being killed, then free its slot or prestart in it."""
        # The slot's next process sweeps the uid as it starts, so when one
        # is wanted anyway, the zygote forks once per run instead of twice.
        refill = process.refill and self._ready.qsize() < self.prestart
        try:
            if process.pid is not None and self._zygote.isolation.get("namespaces"):
                # Killed already: the end of the PID namespace it was init of takes everything the
                # run started, and its files were a tmpfs of that namespace. Once it is gone, the
                # slot (and so the uid) is free.
                if process.pidfd is not None:
                    readable(process.pidfd, 5.0)
                self._zygote.forget(process.pid)
            elif process.pid is not None:
                self._zygote.reap(process.pid, process.workdir, process.uid, process.uid, sweep=not refill)
            else:
                shutil.rmtree(process.workdir, ignore_errors=True)
        except Exception:  # a lost zygote takes its processes with it
            shutil.rmtree(process.workdir, ignore_errors=True)
            refill = False
        try:
            self._containment.clear(process.slot)
        except OSError:
            refill = False
        process.close()
        if refill:
            self._prestart(process.slot)
        elif process.evicted:
            # Together: a waiter that finds no slot must not find the eviction done either (it would evict another).
            with self._evict_lock:
                self._slots.put(process.slot)
                self._evicting -= 1
        else:
            self._slots.put(process.slot)

    def _process_limits(self, limits: SandboxLimits) -> dict[str, int | None]:
        """The limits a run process is started under (the rest its session enforces)."""
        return {
            "memory_bytes": limits.memory_bytes,
            # Counted per uid: without a uid of its own a run would share the worker's count.
            "processes": limits.processes if self._uid_base is not None else None,
            "open_files": limits.open_files,
            "file_bytes": limits.file_bytes,
            "tmp_bytes": limits.tmp_bytes,
            # CPU time is lowered by the run to its own budget once it knows its job. A process that may be
            # kept warm starts under the longest run's budget whatever the workflow's own limit, so a later run
            # still gets its whole budget (the runtime moves the soft limit run by run: see runtime._allow_cpu).
            "cpu_seconds": cpu_budget(self.max_seconds + self.hard_grace_seconds,
                                      None if self._warm is not None else limits.cpu_seconds),
        }

    def _same_process_limits(self, limits: SandboxLimits) -> bool:
        """Whether a prestarted process (started under the sandbox's limits) suits a run under ``limits``."""
        return limits is self.limits or self._process_limits(limits) == self._own_process_limits

    def _take_ready(self) -> RunProcess | None:
        """A started process waiting for a job, passing over any that died meanwhile or whose zygote did."""
        while True:
            try:
                process = self._ready.get_nowait()
            except queue.Empty:
                return None
            # A pidfd reads as ready once its process has exited. One whose zygote died is dying too, but
            # may not have exited yet: handed the job, it would die under it and fail a run that a fresh
            # process, from a new zygote, serves.
            exited = process.pidfd is not None and readable(process.pidfd)
            if not exited and self._zygote.running(process.zygote):
                return process
            process.kill()  # the clean-up takes it for dead, and it must not outlive its zygote unnoticed
            self._cleanup.put(process)

    def run(self, code: bytes, job: dict[str, Any], soft_seconds: float,
            on_emit: Callable[[str, Any], None] | None = None, source: str | None = None,
            gate: Callable[[], bool] | None = None, on_call: CallHandler | None = None,
            slot_timeout: float | None = None, cancel: StopRequest | None = None,
            on_idle: Callable[[], None] | None = None, limits: SandboxLimits | None = None,
            on_log: Callable[[dict[str, Any], bool], None] | None = None,
            reuse: Hashable | None = None) -> RunOutcome:
        """Run ``execute(ctx)`` of the compiled ``code`` for ``job``; never raises for the script's faults.

        ``gate`` is called once the job is handed over, so the caller's own
        bookkeeping overlaps the run's start; when it returns False the run is
        killed before anything it sent is read, and the outcome is ``skipped``.
        ``limits`` replaces the sandbox's own for this run (a workflow's
        overrides); a run whose process limits differ gets a process of its
        own instead of a prestarted one. ``cancel`` stops the run, ending it
        with the reason it was asked with. ``on_log`` gets each log line kept
        (and whether it is the one saying the log was cut), handed on by
        ``on_idle`` with the emits, before a ctx call, or on its own timer.
        ``reuse``: the run's key (its account and workflow version) when its
        process may be kept warm for the next run of that key, and it may be
        served by one kept so; None (a run carrying secrets, say): a fresh process,
        ended after the run. Ignored unless the sandbox was made with ``reuse``.
        """
        limits = limits or self.limits
        key = (reuse, limits) if reuse is not None and self._warm is not None else None
        outcome = RunOutcome()
        process: RunProcess | None = None
        keep = False
        try:
            budget = cpu_budget(soft_seconds + self.hard_grace_seconds, limits.cpu_seconds)
            process = self._take_warm(key, budget) if key is not None else None
            if process is None and self._same_process_limits(limits):
                process = self._take_ready()
            if process is None:
                try:
                    process = self._spawn(self._free_slot(slot_timeout), limits)
                except queue.Empty:
                    raise SandboxError(f"no free sandbox slot within {slot_timeout:g}s") from None
            outcome.pid = process.pid
            session = RunSession(process, self._zygote, limits, soft_seconds, self.hard_grace_seconds, outcome,
                                 on_emit=on_emit, on_call=on_call, cancel=cancel, on_idle=on_idle, on_log=on_log)
            watch = None
            try:
                watch = self._containment.watch(process, limits, session.cpu_seconds)
                session.start(code, job, source, reuse=key is not None)
                if gate is not None and not gate():
                    outcome.skipped = True
                    return outcome
                session.follow()
            except OSError as exc:  # the process died before it took the job
                outcome.error = session.crashed() if isinstance(exc, BrokenPipeError) else SandboxError(
                    f"could not hand the job to the sandbox process: {exc}")
            finally:
                verdict = self._containment.release(watch) if watch is not None else None
                if verdict is not None and not outcome.skipped:  # what killed it, rather than how it died
                    outcome.error, outcome.result, outcome.result_json = verdict, None, None
                keep = (key is not None and session.reusable and verdict is None and not outcome.skipped
                        and (cancel is None or cancel.reason is None) and process.runs + 1 < self._warm.max_runs)
                if not keep:
                    session.close()
        except SandboxError as exc:
            outcome.error = exc
        finally:
            if process is not None and not (keep and self._offer(process, key, budget)):
                if keep and process.sock is not None:
                    process.sock.close()
                process.kill()
                self._cleanup.put(process)
        return outcome

    def _offer(self, process: RunProcess, key: Hashable, budget: int) -> bool:
        """Offer ``process`` to the warm pool for the next run of ``key`` (its first run gave it the key), which
        keeps it once it says ready and passes the worker's own checks (:meth:`_admit`); False if it may not be.

        Not offered when its CPU hard limit leaves no room for another run of ``budget`` (a workflow whose budget
        is the longest run's): it would be parked only to be retired by its next run.
        """
        assert process.sock is not None and self._warm is not None
        if process.key not in (None, key) or not self._zygote.running(process.zygote) or \
                not self._zygote.isolation.get("namespaces") or not answered(process, budget):
            return False
        process.key = key
        process.runs += 1
        self._warm.settle(process)  # off the caller's path: the answer is on its way already
        return True

    def _admit(self, process: RunProcess) -> bool:
        """Whether a process that said ready may wait for its next run: stopped, alone, under the running zygote."""
        cgroups = self._containment.cgroups
        members = (lambda: cgroups.members(process.slot)) if cgroups is not None else None
        return freeze(process, members) and self._zygote.running(process.zygote)

    def _take_warm(self, key: Hashable, cpu_seconds: int) -> RunProcess | None:
        """A warm process of ``key`` that is still alive and stopped, under the zygote running now, with room for
        ``cpu_seconds`` of CPU time, continued; None when there is none."""
        assert self._warm is not None
        while True:
            process = self._warm.take(key)
            if process is None:
                return None
            if not (process.pidfd is not None and readable(process.pidfd)) and \
                    self._zygote.running(process.zygote) and thaw(process, cpu_seconds):
                return process
            self._retire(process)

    def _free_slot(self, timeout: float | None) -> int:
        """A free slot, within ``timeout`` (None: however long it takes); queue.Empty when none came.

        Warm processes hold their slots while they wait: when none is free,
        the least recently used of them is retired, and its slot, once
        cleaned, is this run's (or another's that asked meanwhile).
        """
        if self._warm is None:
            return self._slots.get(timeout=timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._evict_lock:
            self._waiting += 1
        try:
            while True:
                try:
                    return self._slots.get_nowait()
                except queue.Empty:
                    pass
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                victim = None
                with self._evict_lock:  # no more evictions under way than runs waiting for the slots they free
                    try:
                        return self._slots.get_nowait()  # an eviction ended since the first look
                    except queue.Empty:
                        pass
                    if self._evicting < self._waiting:
                        victim = self._warm.evict()
                        self._evicting += victim is not None
                if victim is not None:
                    victim.refill = False  # its slot goes back free, not to a process started ahead of need
                    victim.evicted = True
                    self._retire(victim)
                try:
                    # Not one long wait: a process parked meanwhile holds a slot that only an eviction frees.
                    return self._slots.get(timeout=0.05 if remaining is None else min(remaining, 0.05))
                except queue.Empty:
                    continue
        finally:
            with self._evict_lock:
                self._waiting -= 1
