"""Small process helpers shared by the command line, the worker and the sandbox."""
from __future__ import annotations

import ctypes
import signal
import socket

__all__ = ["set_parent_death_signal", "set_not_dumpable", "free_port"]

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_libc = None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (a no-op elsewhere)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def set_not_dumpable() -> None:
    """Make this process (and what it forks) non-dumpable: its /proc files (environ, mem, maps) turn
    root-owned and no process of the same uid may ptrace it. A run sharing the worker's uid (a worker
    not started as root) then cannot read the provider keys in the worker's environment."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
