"""Small process helpers shared by the command line, the worker and the sandbox."""
from __future__ import annotations

import ctypes
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["set_parent_death_signal", "set_not_dumpable", "free_port", "bind_error", "url_host", "interrupt_once"]

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


def interrupt_once(signum: int, frame: object) -> None:
    """A SIGINT and SIGTERM handler for a command that stops what it started when interrupted: the first signal
    raises KeyboardInterrupt, and both are ignored from then on, so a second one (the SIGINT a Ctrl-C sends the
    whole process group, an impatient second Ctrl-C) cannot break off that stop half done, leaving processes and
    their directories behind. Ignored, they stay ignored in the processes started after (none are, while stopping).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


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


@contextmanager
def _bound(host: str, port: int) -> Iterator[socket.socket]:
    """A TCP socket of ``host``'s family (IPv4 or IPv6) bound to ``host:port``, closed on exit.

    Bound as a server binds (gunicorn, Flower): SO_REUSEADDR, so a port whose
    last connections linger in TIME_WAIT counts as free.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        yield sock


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on ``host:port`` right now (EADDRINUSE: another server has it; a
    ``socket.gaierror``: no such address); None: it could."""
    try:
        with _bound(host, port):
            return None
    except OSError as exc:  # socket.gaierror is one too
        return exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` (an IPv4 or IPv6 address, or a name) right now."""
    with _bound(host, 0) as sock:
        return int(sock.getsockname()[1])


def url_host(host: str) -> str:
    """``host`` as it goes in a URL or a ``HOST:PORT`` bind: an IPv6 literal in brackets (``[::1]``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
