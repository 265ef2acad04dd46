"""Limits on a run as a whole: memory, processes and CPU time of all its processes together.

Per-process rlimits alone let a run hold its memory limit once per process
it forks. :class:`Containment` bounds the sum, in the strongest way the host
allows, chosen when the sandbox starts:

``cgroup``     a cgroup per run slot (:mod:`.cgroups`): the kernel holds the
               run's memory (the OOM killer acts inside the cgroup), its
               process count (``fork`` fails with EAGAIN) and counts its CPU
               time; a monitor thread ends a run whose cgroup saw an OOM kill
               or passed its CPU budget.
``watchdog``   where no cgroup is usable (or ``FLOWPOOL_SANDBOX_CGROUPS=off``):
               the per-process rlimits stay, and the monitor sums the
               proportional set size (PSS) and CPU time of the run's processes
               (its descendants, and everything of its uid) every
               :data:`WATCHDOG_TICK` seconds, killing a run over its limit.
               It bounds the sum only up to what a run allocates in one tick.

A run the monitor stops ends in :class:`~flowpool.errors.MemoryLimitExceeded`
(or a SandboxError naming the CPU time limit); the worker's next run in the
slot starts clean.
"""
from __future__ import annotations

import functools
import os
import signal
import threading
from dataclasses import dataclass

from flowpool.errors import MemoryLimitExceeded, RunError, SandboxError

from .cgroups import SlotCgroups, open_cgroups
from .linux import children, kill_if, stat_fields
from .protocol import SandboxLimits
from .run_process import RunProcess

__all__ = ["CGROUP_TICK", "Containment", "RunWatch", "WATCHDOG_TICK"]

CGROUP_TICK = 0.1  # the kernel enforces the limits; the monitor only ends the run that hit one
WATCHDOG_TICK = 0.05
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class RunWatch:
    """One run the monitor follows, and its verdict once it broke a limit."""

    process: RunProcess
    memory_bytes: int
    cpu_seconds: float
    oom_base: int = 0
    cpu_base: float = 0.0
    verdict: RunError | None = None


@dataclass
class _Proc:
    """A process as one /proc scan saw it."""

    ppid: int
    uid: int | None  # read only when a run followed has a uid of its own
    start: str  # start time in clock ticks since boot: with the pid, names the process
    cpu: float  # its own and its waited-for children's CPU seconds


class Containment:
    """Bounds each run as a whole; one per sandbox, with a cgroup per slot where it can."""

    def __init__(self, slots: int, mode: str = "auto") -> None:
        if mode not in ("auto", "off"):
            raise ValueError(f"unknown sandbox cgroups setting {mode!r}: use auto or off")
        self._slots = slots
        self._mode = mode
        self.cgroups: SlotCgroups | None = None
        self._why = "turned off by FLOWPOOL_SANDBOX_CGROUPS=off"
        self._watches: list[RunWatch] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._follow, name="flowpool-sandbox-monitor", daemon=True)

    def start(self) -> None:
        """Make the slots' cgroups (where the host allows and the setting does not forbid) and start the monitor."""
        if self._mode == "auto":
            self.cgroups, self._why = open_cgroups(self._slots)
        self._monitor.start()

    def stop(self) -> None:
        """Stop the monitor; kill what is left in the cgroups and remove them."""
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(5)
        if self.cgroups is not None:
            self.cgroups.remove()
            self.cgroups = None

    def describe(self) -> str:
        """How runs are bounded as a whole, for people; a WARNING when only by a watchdog."""
        if self.cgroups is not None:
            return f"run limits: {self.cgroups.describe()}"
        return (f"WARNING: run limits: per-process rlimits + memory watchdog (no cgroup per run: {self._why}); "
                f"a run's processes together may pass its memory limit by what they allocate in {WATCHDOG_TICK}s")

    def prepare(self, slot: int, limits: SandboxLimits, has_init: bool) -> list[int]:
        """Set ``slot``'s limits for its next run process: the files that process joins the slot's cgroup through."""
        if self.cgroups is None:
            return []
        # A run in namespaces of its own has an init above the process that takes the job.
        self.cgroups.configure(slot, limits.memory_bytes, limits.processes + (1 if has_init else 0))
        return self.cgroups.procs_fds(slot)

    def clear(self, slot: int) -> None:
        """Kill whatever a run left in its slot's cgroup before the slot is used again."""
        if self.cgroups is not None:
            self.cgroups.kill(slot, wait=5.0)

    def watch(self, process: RunProcess, limits: SandboxLimits, cpu_seconds: float) -> RunWatch:
        """Follow a run from before its job starts until :meth:`release`."""
        watch = RunWatch(process, limits.memory_bytes, cpu_seconds)
        if self.cgroups is not None:
            watch.oom_base = self.cgroups.oom_kills(process.slot)
            watch.cpu_base = self.cgroups.cpu_seconds(process.slot) or 0.0
        if (self.cgroups is None or not self._cgroup_cpu(process.slot)) and process.runs and process.pid is not None:  # kept warm: its earlier runs' CPU time is not this one's
            watch.cpu_base = _tree_cpu(process.pid)
        with self._lock:
            self._watches.append(watch)
        return watch

    def release(self, watch: RunWatch) -> RunError | None:
        """Stop following ``watch`` (its processes are done or being killed): the limit it broke, if any.

        The cgroup gets a last look: an OOM kill the run outlived still fails it.
        """
        with self._lock:  # once out of the list, the monitor no longer touches the run's process
            if watch in self._watches:
                self._watches.remove(watch)
        if watch.verdict is None and self.cgroups is not None:
            watch.verdict = self._judge_cgroup(watch)
        return watch.verdict

    def _follow(self) -> None:
        tick = CGROUP_TICK if self.cgroups is not None else WATCHDOG_TICK
        while not self._stop.wait(tick):
            with self._lock:
                watches = [w for w in self._watches if w.verdict is None]
            if not watches:
                continue
            try:
                if self.cgroups is not None:
                    for watch in watches:
                        verdict = self._judge_cgroup(watch)
                        if verdict is not None:
                            self._stop_run(watch, verdict, [])
                else:
                    self._judge_processes(watches)
            except OSError:
                pass  # a run that ended meanwhile: its session sees it

    def _judge_cgroup(self, watch: RunWatch) -> RunError | None:
        """The limit the run's cgroup says it broke, if any."""
        assert self.cgroups is not None
        slot = watch.process.slot
        if self.cgroups.oom_kills(slot) > watch.oom_base:
            return self._memory_verdict(watch)
        used = self.cgroups.cpu_seconds(slot)
        if used is None and watch.process.pid is not None:
            # No CPU counter (cgroup v1 without cpuacct): the run's processes' own times, as the watchdog sums
            # them. RLIMIT_CPU alone does not hold a warm process, whose soft limit a script may raise.
            used = _tree_cpu(watch.process.pid)
        if used is not None and used - watch.cpu_base > watch.cpu_seconds:
            return self._cpu_verdict(watch)
        return None

    def _cgroup_cpu(self, slot: int) -> bool:
        """Whether the slot's cgroup counts its CPU time (cgroup v1 may lack cpuacct)."""
        return self.cgroups is not None and self.cgroups.cpu_seconds(slot) is not None

    def _judge_processes(self, watches: list[RunWatch]) -> None:
        """The watchdog: sum each run's processes' PSS and CPU time from one scan of /proc."""
        table = _scan(uids=any(watch.process.uid is not None for watch in watches))
        children: dict[int, list[int]] = {}
        for pid, proc in table.items():
            children.setdefault(proc.ppid, []).append(pid)
        for watch in watches:
            members = _members(table, children, watch)
            if sum(_pss(pid) for pid in members) > watch.memory_bytes:
                self._stop_run(watch, self._memory_verdict(watch), [(pid, table[pid].start) for pid in members])
            elif sum(table[pid].cpu for pid in members) - watch.cpu_base > watch.cpu_seconds:
                self._stop_run(watch, self._cpu_verdict(watch), [(pid, table[pid].start) for pid in members])

    @staticmethod
    def _memory_verdict(watch: RunWatch) -> MemoryLimitExceeded:
        mib = watch.memory_bytes >> 20
        return MemoryLimitExceeded(f"the run used more than its {mib} MiB memory limit (all its processes together)",
                                   limit_mb=mib)

    @staticmethod
    def _cpu_verdict(watch: RunWatch) -> SandboxError:
        return SandboxError(f"the run passed its CPU time limit ({watch.cpu_seconds:g}s, all its processes together) "
                            "and was killed", signal=int(signal.SIGKILL))

    def _stop_run(self, watch: RunWatch, verdict: RunError, members: list[tuple[int, str]]) -> None:
        """Record why the run ends, then kill it and everything it started (unless it ended meanwhile)."""
        with self._lock:  # its session may be done with it: then its pidfd and slot are no longer its own
            if watch not in self._watches:
                return
            watch.verdict = verdict
            watch.process.kill()
            if self.cgroups is not None:
                self.cgroups.kill(watch.process.slot)
            for pid, start in members:  # only a process the scan saw, not one that took its pid since
                kill_if(pid, functools.partial(_started_at, pid, start))


def _uid(pid: str) -> int:
    """The real uid of a process, from its /proc status."""
    with open(f"/proc/{pid}/status", "rb") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(b"Uid:"))


def _scan(uids: bool) -> dict[int, _Proc]:
    """Every process on the host: parent, start time, CPU time and, when ``uids``, uid, from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = stat_fields(entry.name)
            uid = _uid(entry.name) if uids else None
        except (OSError, StopIteration, IndexError):
            continue  # exited meanwhile
        # Fields after the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14) ... start(19).
        cpu = sum(int(value) for value in stat[11:15]) / _CLOCK_TICKS
        table[int(entry.name)] = _Proc(int(stat[1]), uid, stat[19], cpu)
    return table


def _members(table: dict[int, _Proc], children: dict[int, list[int]], watch: RunWatch) -> list[int]:
    """A run's processes: its descendants (``children``: the table's pids by parent), and any process of its uid
    (one that left its tree)."""
    root, uid = watch.process.pid, watch.process.uid
    found, todo = set(), [root] if root in table else []
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    if uid is not None:
        found |= {pid for pid, proc in table.items() if proc.uid == uid}
    return sorted(found)


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (their own and their waited-for children's), from /proc."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            stat = stat_fields(current)
            total += sum(int(value) for value in stat[11:15]) / _CLOCK_TICKS
            todo.extend(children(current))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return total


def _pss(pid: int) -> int:
    """Proportional set size of a process in bytes (pages it shares are split among their sharers); 0 if gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _started_at(pid: int, start: str) -> bool:
    """Whether ``pid`` started at ``start`` (clock ticks since boot): the process a scan saw, if so."""
    return stat_fields(pid)[19] == start
