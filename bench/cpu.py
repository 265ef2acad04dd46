"""CPU-seconds spent by groups of processes (the API, the workers, Redis) over a measured window.

A group is a list of root pids; each root counts with its whole process tree.
A process's own time (utime + stime) counts while it lives; once it exits and
is reaped, the kernel adds its time to its parent's cutime + cstime, so a run
process that came and went within the window still counts, through the
zygote or the worker that waited for it. Processes reparented to init (a
double fork) are lost to the count: flowpool's run processes are not.

Unlike runs/s, CPU per run is comparable across machines.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import psutil

__all__ = ["CpuMeter", "tree_cpu_seconds"]


def tree_cpu_seconds(pid: int) -> float:
    """CPU-seconds of ``pid`` and its descendants, reaped children included (0 when it is gone)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # exited between the listing and now: its time is in its parent's children_* once reaped
        total += times.user + times.system + times.children_user + times.children_system
    return total


class CpuMeter:
    """CPU-seconds of named groups of process trees, between two snapshots."""

    def __init__(self, groups: Mapping[str, Iterable[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self._before: dict[str, float] | None = None

    def snapshot(self) -> dict[str, float]:
        """Each group's CPU-seconds so far."""
        return {name: sum(tree_cpu_seconds(pid) for pid in pids) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._before = self.snapshot()

    def stop(self) -> dict[str, float]:
        """Each group's CPU-seconds since ``start``."""
        assert self._before is not None, "start() first"
        after = self.snapshot()
        return {name: after[name] - self._before[name] for name in after}

    @staticmethod
    def per_run_ms(spent: Mapping[str, float], runs: float) -> dict[str, float]:
        """Milliseconds of CPU per run of each group."""
        return {name: 1000 * seconds / runs if runs else float("nan") for name, seconds in spent.items()}
