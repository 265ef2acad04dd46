"""Run processes kept warm after a clean run, for the next run of the same key (FLOWPOOL_SANDBOX_REUSE).

A key is the account, the workflow version (its content hash) and the run's
limits: a process serves only runs of the key its first run had, so nothing
of one account reaches another. The sandbox keeps a process here only after a
run that ended with a result or the script's own error, that carried no
secrets, and that left nothing behind (:mod:`.reuse`); each holds its slot (its
uid and cgroup) while it waits. A process is retired after
``max_runs`` runs, after ``idle_seconds`` without one, when a run of another
key needs its slot (least recently used first), and when the worker stops.
"""
from __future__ import annotations

import threading
import time
from typing import Hashable

from .run_process import RunProcess

__all__ = ["WarmPool"]


class WarmPool:
    """The idle warm processes of one sandbox, least recently used first; thread-safe."""

    def __init__(self, max_runs: int, idle_seconds: float) -> None:
        self.max_runs = max_runs
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: list[RunProcess] = []
        self._closed = False

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, key: Hashable) -> RunProcess | None:
        """The most recently parked process of ``key``, no longer idle; None when there is none."""
        with self._lock:
            for index in range(len(self._idle) - 1, -1, -1):
                if self._idle[index].key == key:
                    return self._idle.pop(index)
        return None

    def park(self, process: RunProcess) -> bool:
        """Keep ``process`` (its key set) waiting for its next run; False once the pool is closed."""
        with self._lock:
            if self._closed:
                return False
            process.idle_since = time.monotonic()
            self._idle.append(process)
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
        """Stop keeping processes: every idle one, taken out (the sandbox is stopping)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        return idle
