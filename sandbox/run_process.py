"""A run process as the worker holds it: the slot and uid it runs under, its channel, a pidfd to kill it by."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from typing import Hashable

__all__ = ["RunProcess"]


@dataclass
class RunProcess:
    """A run process started ahead of its job, holding a slot (and so a uid)."""

    slot: int
    uid: int | None
    workdir: str
    pid: int | None = None
    sock: socket.socket | None = None
    pidfd: int | None = None  # signals reach this process even after its pid is reused
    zygote: subprocess.Popen[bytes] | None = None  # the zygote that forked it (see Zygote.running)
    # Kept warm (:mod:`.warm`): the key of the runs it serves, set by its first run and never changed,
    # how many runs it served, and since when it waits (time.monotonic()).
    key: Hashable | None = None
    runs: int = 0
    idle_since: float = 0.0
    refill: bool = True  # once cleaned up, its slot may get a process started ahead of need (not when evicted)
    evicted: bool = False  # retired for its slot, which a run waits for (Sandbox._free_slot)
    cpu_answered: float = 0.0  # kept warm: the CPU seconds it and its init had used when it last answered
    # Kept warm, with namespaces: the run process under its init (process.pid), found and held when first parked.
    run_pid: int | None = None
    run_pidfd: int | None = None

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
        """Close the pidfds (the channel is the caller's to close)."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.run_pidfd is not None:
            os.close(self.run_pidfd)
            self.run_pidfd = None
