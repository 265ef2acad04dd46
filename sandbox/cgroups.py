"""A cgroup per run slot: the memory, process and CPU-time limits of a run as a whole, all its processes together.

A sandbox makes one parent cgroup for its worker under the worker's own
cgroup, and one child per run slot, reused run after run. A run process joins
its slot's cgroup before it runs any code of the job: the worker hands the
zygote the slot's open ``cgroup.procs`` files with the spawn, and the forked
process writes ``0`` (itself) to them first thing, so everything it forks is
born inside. The files were opened by the worker, so the kernel checks the
worker's credentials and cgroup namespace, not those of the zygote inside
bwrap (which sees no /sys/fs/cgroup at all).

``cgroup v2``  the worker's cgroup must be delegated to it (memory and pids in
               its ``cgroup.controllers``, the directory writable). A cgroup
               that holds processes cannot hand controllers to children, so
               when the worker's own cgroup refuses, the worker moves itself
               into a leaf child ``flowpool-worker-<pid>`` first.
``cgroup v1``  writable ``memory`` and ``pids`` hierarchies (``cpuacct`` when
               mounted), as root.

:func:`open_cgroups` returns None where neither works; the sandbox then falls
back to a watchdog (:mod:`.containment`).
"""
from __future__ import annotations

import errno
import functools
import itertools
import os
import time

from .linux import kill_if

__all__ = ["SlotCgroups", "open_cgroups"]

_SYS = "/sys/fs/cgroup"
_instances = itertools.count(1)


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _field(text: bytes, name: bytes) -> int:
    """The value of ``name`` in a flat-keyed cgroup file's text (``memory.events``, ``cpu.stat``), 0 when absent."""
    for line in text.splitlines():
        key, _, value = line.partition(b" ")
        if key == name:
            return int(value)
    return 0


def _in_cgroup(pid: int, tail: str) -> bool:
    """Whether ``pid`` is in the cgroup whose path ends in ``tail``, as ``/proc/<pid>/cgroup`` says."""
    return any(line.endswith(tail) for line in _read(f"/proc/{pid}/cgroup").splitlines())


def _pread(fd: int) -> bytes:
    """The current text of a cgroup file kept open: reading at offset 0 makes the kernel show it afresh."""
    return os.pread(fd, 4096, 0)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """Cgroup mounts of this process: (mount root, mount point, fstype, super options)."""
    found = []
    for line in _read("/proc/self/mountinfo").splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller, and under "" its v2 cgroup."""
    paths = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _join(mount_root: str, mount_point: str, path: str) -> str:
    """The directory of cgroup ``path`` under a mount of cgroup ``mount_root``."""
    if mount_root != "/" and path.startswith(mount_root):
        path = path[len(mount_root):]
    return os.path.join(mount_point, path.lstrip("/"))


def _remove_stale(directory: str) -> None:
    """Remove the empty cgroups of workers that died without cleaning up (their pid is gone)."""
    try:
        entries = [e for e in os.scandir(directory) if e.is_dir() and e.name.startswith("flowpool-")]
    except OSError:
        return
    for entry in entries:
        owner = entry.name.split("-")[1]
        if not owner.isdigit() or os.path.exists(f"/proc/{owner}"):
            continue
        for child in [c.path for c in os.scandir(entry.path) if c.is_dir()] + [entry.path]:
            try:
                os.rmdir(child)
            except OSError:
                pass


class SlotCgroups:
    """The parent cgroup of one sandbox and a child per slot; every read and write of their files.

    A run reads its slot's counters when it starts and ends, so their files
    stay open (one ``pread`` each, no open and close per run), as do the
    ``cgroup.procs`` files each run process joins through; a slot's limits
    are written only when they change: runs under the sandbox's own limits
    write nothing at all.
    """

    version = ""
    # (controller, file) of the counters read per run: OOM kills first, CPU time second (absent: not counted).
    _counter_files: tuple[tuple[str, str], ...] = ()

    def __init__(self, parents: dict[str, str], slots: int) -> None:
        self._parents = parents  # controller (v1) or "" (v2) -> the sandbox's parent directory
        self.slots = slots
        self._fds: dict[int, list[int]] = {}  # slot -> its open cgroup.procs files, one per hierarchy
        self._limits: dict[int, tuple[int, int]] = {}  # slot -> the (memory, processes) its files hold
        self._counters: dict[int, list[int]] = {}  # slot -> open counter files, as _counter_files lists them
        for slot in range(slots):
            for parent in parents.values():
                os.makedirs(self._dir(parent, slot), exist_ok=True)
            self._set_up(slot)
            self._fds[slot] = [os.open(os.path.join(self._dir(parent, slot), "cgroup.procs"),
                                       os.O_WRONLY | os.O_CLOEXEC) for parent in parents.values()]
            self._counters[slot] = [os.open(os.path.join(self.path(controller, slot), name),
                                            os.O_RDONLY | os.O_CLOEXEC)
                                    for controller, name in self._counter_files if controller in parents]

    def _set_up(self, slot: int) -> None:
        """Write the settings every run of ``slot`` shares, once."""

    @staticmethod
    def _dir(parent: str, slot: int) -> str:
        return os.path.join(parent, f"slot-{slot}")

    def path(self, controller: str, slot: int) -> str:
        """The directory of ``slot`` in the hierarchy of ``controller``."""
        return self._dir(self._parents[controller], slot)

    @property
    def controllers(self) -> list[str]:
        """The limits in force, for people: memory, pids and (when its usage can be read) cpu."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"cgroup {self.version} ({', '.join(self.controllers)})"

    def procs_fds(self, slot: int) -> list[int]:
        """The slot's ``cgroup.procs`` files, open for writing (one per hierarchy), kept for the slot's next runs."""
        return self._fds[slot]

    def configure(self, slot: int, memory_bytes: int, processes: int) -> None:
        """Set the limits of the slot's next run (nothing to write when they are the last run's)."""
        if self._limits.get(slot) == (memory_bytes, processes):
            return
        self._limits.pop(slot, None)  # unknown until written in full
        self._write_limits(slot, memory_bytes, processes)
        self._limits[slot] = (memory_bytes, processes)

    def _write_limits(self, slot: int, memory_bytes: int, processes: int) -> None:
        raise NotImplementedError

    def oom_kills(self, slot: int) -> int:
        """How many processes the kernel killed in the slot for its memory limit, ever (a counter)."""
        return _field(_pread(self._counters[slot][0]), b"oom_kill")

    def cpu_seconds(self, slot: int) -> float | None:
        """CPU time the slot's processes used, ever (a counter); None where it cannot be read."""
        raise NotImplementedError

    def members(self, slot: int) -> list[int]:
        """Pids of the processes in the slot."""
        text = _read(os.path.join(self.path(self._procs_controller, slot), "cgroup.procs"))
        return [int(pid) for pid in text.split()]

    _procs_controller = ""

    def kill(self, slot: int, wait: float = 0.0) -> bool:
        """Kill every process in the slot; with ``wait``, until it is empty or ``wait`` seconds pass: whether it is.

        A slot is most often empty already (its run's namespace took its
        processes with it): then one read of ``cgroup.procs`` is all it costs.
        """
        deadline = time.monotonic() + wait
        pids = self.members(slot)
        if not pids:
            return True
        self._kill_all(slot)
        tail = self._relative(self.path(self._procs_controller, slot))
        while pids:
            for pid in pids:  # only a pid still the slot's member: one read from cgroup.procs may be reused meanwhile
                kill_if(pid, functools.partial(_in_cgroup, pid, tail))
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
            pids = self.members(slot)
        return True

    def _kill_all(self, slot: int) -> None:
        """Kill the slot's processes at once where the kernel can (before each is killed by pid)."""

    @staticmethod
    def _relative(directory: str) -> str:
        """The tail of a slot's directory that /proc/<pid>/cgroup shows (its parent's and its own name)."""
        return "/" + "/".join(directory.rstrip("/").split("/")[-2:])

    def remove(self) -> None:
        """Kill what is left in every slot, close the files, remove the cgroups (retrying while the dead leave)."""
        for fds in [*self._fds.values(), *self._counters.values()]:
            for fd in fds:
                os.close(fd)
        self._fds.clear()
        self._counters.clear()
        for slot in range(self.slots):
            try:
                self.kill(slot, wait=2.0)
            except OSError:
                pass
        for parent in self._parents.values():
            for directory in [self._dir(parent, slot) for slot in range(self.slots)] + [parent]:
                deadline = time.monotonic() + 2.0
                while True:
                    try:
                        os.rmdir(directory)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:
                        if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                            break
                        time.sleep(0.01)


class _V1(SlotCgroups):
    version = "v1"
    _procs_controller = "pids"
    _counter_files = (("memory", "memory.oom_control"), ("cpuacct", "cpuacct.usage"))

    @property
    def controllers(self) -> list[str]:
        return ["memory", "pids"] + (["cpu"] if "cpuacct" in self._parents else [])

    def _write_limits(self, slot: int, memory_bytes: int, processes: int) -> None:
        memory = self.path("memory", slot)
        limit = os.path.join(memory, "memory.limit_in_bytes")
        with_swap = os.path.join(memory, "memory.memsw.limit_in_bytes")
        # memory+swap may never be below memory alone: which goes first depends on the way the limit moves.
        try:
            _write(limit, str(memory_bytes))
            if os.path.exists(with_swap):
                _write(with_swap, str(memory_bytes))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _write(with_swap, str(memory_bytes))
            _write(limit, str(memory_bytes))
        _write(os.path.join(self.path("pids", slot), "pids.max"), str(processes))

    def cpu_seconds(self, slot: int) -> float | None:
        counters = self._counters[slot]
        return int(_pread(counters[1])) / 1e9 if len(counters) > 1 else None


class _V2(SlotCgroups):
    version = "v2"
    _counter_files = (("", "memory.events"), ("", "cpu.stat"))

    @property
    def controllers(self) -> list[str]:
        return ["memory", "pids", "cpu"]

    def _set_up(self, slot: int) -> None:
        directory = self.path("", slot)
        for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
            try:  # memory.swap.max is absent without swap accounting
                _write(os.path.join(directory, name), value)
            except OSError:
                pass

    def _write_limits(self, slot: int, memory_bytes: int, processes: int) -> None:
        directory = self.path("", slot)
        _write(os.path.join(directory, "memory.max"), str(memory_bytes))
        _write(os.path.join(directory, "pids.max"), str(processes))

    def cpu_seconds(self, slot: int) -> float | None:
        return _field(_pread(self._counters[slot][1]), b"usage_usec") / 1e6

    def _kill_all(self, slot: int) -> None:
        try:  # one write kills every process in the cgroup, forks in flight included (Linux 5.14+)
            _write(os.path.join(self.path("", slot), "cgroup.kill"), "1")
        except OSError:
            pass


def _name() -> str:
    return f"flowpool-{os.getpid()}-{next(_instances)}"


def _open_v1(slots: int) -> SlotCgroups:
    own = _own_paths()
    parents: dict[str, str] = {}
    for root, point, fstype, options in _mounts():
        if fstype != "cgroup":
            continue
        for controller in ("memory", "pids", "cpuacct"):
            if controller in options and controller in own and controller not in parents:
                parents[controller] = _join(root, point, own[controller])
    if "memory" not in parents or "pids" not in parents:
        raise OSError(errno.ENOENT, "no cgroup v1 memory and pids hierarchies")
    name = _name()
    made = []
    try:
        for controller, directory in list(parents.items()):
            _remove_stale(directory)
            parents[controller] = os.path.join(directory, name)
            os.mkdir(parents[controller])
            made.append(parents[controller])
        return _V1(parents, slots)
    except OSError:
        for directory in made:
            try:
                os.rmdir(directory)
            except OSError:
                pass
        raise


def _enable_controllers(directory: str) -> None:
    """Hand memory and pids to ``directory``'s children; moves this process to a leaf if ``directory`` holds it."""
    control = os.path.join(directory, "cgroup.subtree_control")
    try:
        _write(control, "+memory +pids")
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    # A cgroup holding processes cannot enable controllers for its children ("no internal processes").
    leaf = os.path.join(directory, f"flowpool-worker-{os.getpid()}")
    os.makedirs(leaf, exist_ok=True)
    _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
    try:
        _write(control, "+memory +pids")
    except OSError:
        _write(os.path.join(directory, "cgroup.procs"), str(os.getpid()))
        os.rmdir(leaf)
        raise


def _open_v2(slots: int) -> SlotCgroups:
    own = _own_paths().get("")
    mount = next(((root, point) for root, point, fstype, _ in _mounts() if fstype == "cgroup2"), None)
    if own is None or mount is None:
        raise OSError(errno.ENOENT, "no cgroup v2 mount")
    directory = _join(mount[0], mount[1], own)
    if own.rsplit("/", 1)[-1].startswith(f"flowpool-worker-{os.getpid()}"):
        directory = os.path.dirname(directory)  # a sandbox of this process moved it to a leaf already
    available = set(_read(os.path.join(directory, "cgroup.controllers")).split())
    if not {"memory", "pids"} <= available:
        raise OSError(errno.ENOENT, f"cgroup v2 {own} is not delegated the memory and pids controllers")
    if not {"memory", "pids"} <= set(_read(os.path.join(directory, "cgroup.subtree_control")).split()):
        _enable_controllers(directory)
    _remove_stale(directory)
    parent = os.path.join(directory, _name())
    os.mkdir(parent)
    try:
        _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
        return _V2({"": parent}, slots)
    except OSError:
        os.rmdir(parent)
        raise


def open_cgroups(slots: int) -> tuple[SlotCgroups | None, str]:
    """Cgroups for ``slots`` run slots, v2 where delegated, else v1 where writable; or None and why neither."""
    problems = []
    for opener in (_open_v2, _open_v1):
        try:
            return opener(slots), ""
        except OSError as exc:
            problems.append(exc.strerror or str(exc))
    if not os.path.isdir(_SYS):
        problems = [f"{_SYS} is not mounted"]
    return None, "; ".join(problems)
