"""What a script sees when it reaches for the network in a sandbox that has none: an error that says so.

The barrier is elsewhere and this module changes nothing of it: the seccomp
filter answers EPERM to every ``socket()`` (:mod:`.seccomp`), and under
bwrap (or a root worker) the run's network namespace is empty. Left alone, a
script porting ``requests.get(url)`` reads ``[Errno 1] Operation not
permitted`` or ``Temporary failure in name resolution`` and learns nothing.
:func:`install`, called in the run process before the job arrives, wraps the
socket layer's entry points so that the error they raise carries
:data:`HINT`, a few lines a user can act on:

- ``socket.socket(...)`` (so ``create_connection``, ``urlopen``, ``requests``,
  asyncio) raises ``PermissionError(EPERM, "Operation not permitted: <hint>")``;
- ``getaddrinfo``, ``gethostbyname(_ex)`` and ``gethostbyaddr`` raise the same
  ``socket.gaierror`` / ``socket.herror`` with the hint after its reason;
- importing an HTTP client the sandbox does not hold (``requests`` under
  bwrap) raises ``ModuleNotFoundError`` with the hint (``import`` statements:
  ``__import__`` is wrapped, and no import finder is added, so
  ``importlib.util.find_spec`` still answers None for a missing one).

Each wrapper calls the original first and only rewrites the message of the
exception it raised, keeping its type and errno: nothing that failed
succeeds, nothing that succeeded fails, and ``except OSError`` /
``except PermissionError`` in a script still catch it. A socket made from
an inherited descriptor (``socket.socket(fileno=fd)``: the run's own channel)
never fails for want of a network, so it is untouched. A script may reach
``_socket`` directly and get the bare errno: the hint is a message, never the
barrier. Imported by the runtime (stdlib only) before the zygote covers
flowpool's code.
"""
from __future__ import annotations

import builtins
import socket
from typing import Any, Callable

__all__ = ["HINT", "install"]

HINT = ("the workflow sandbox has no network; make HTTP requests with ctx.http.get(url) or "
        "ctx.http.post(url, json=...) (the worker sends them) and model calls with ctx.chat.completions.create(...)")

# HTTP clients a script ported from elsewhere imports; the sandbox holds them only when the operator stages them.
_HTTP_CLIENTS = frozenset({"requests", "httpx", "aiohttp", "urllib3", "httplib2", "pycurl"})


def _with_hint(exc: OSError, what: str = "") -> OSError:
    """``exc`` again, of the same type and errno, its reason followed by the hint."""
    reason = exc.strerror or str(exc)
    return type(exc)(exc.errno, f"{reason}{what}: {HINT}")


def _wrap_import(original: Callable[..., Any]) -> Callable[..., Any]:
    """``__import__`` whose failure to find an HTTP client says why there is none. No finder is added, so
    ``importlib.util.find_spec("requests")`` still answers None where a library probes for optional clients."""
    def __import__(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        try:
            return original(name, globals, locals, fromlist, level)
        except ModuleNotFoundError as exc:
            if exc.name not in _HTTP_CLIENTS:
                raise
            raise ModuleNotFoundError(f"No module named {exc.name!r}: {HINT}", name=exc.name) from None

    return __import__


def _wrap_lookup(original: Callable[..., Any]) -> Callable[..., Any]:
    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(host, *args, **kwargs)
        except (socket.gaierror, socket.herror) as exc:
            raise _with_hint(exc, f" (looking up {host!r})") from None

    lookup.__name__ = lookup.__qualname__ = original.__name__
    lookup.__doc__ = original.__doc__
    return lookup


def install() -> None:
    """Make the socket layer's failures in this process say that the sandbox has no network and what to use."""
    # The class's __init__ is wrapped, not the class replaced: sockets made before (the run's channel) stay
    # instances of socket.socket. Its parameters keep socket.socket's names, which callers pass as keywords.
    original_init = socket.socket.__init__

    def __init__(self: socket.socket, family: int = -1, type: int = -1, proto: int = -1,
                 fileno: int | None = None) -> None:
        try:
            original_init(self, family, type, proto, fileno)
        except PermissionError as exc:
            if fileno is not None:
                raise
            raise _with_hint(exc) from None

    socket.socket.__init__ = __init__  # type: ignore[method-assign]
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        setattr(socket, name, _wrap_lookup(getattr(socket, name)))
    builtins.__import__ = _wrap_import(builtins.__import__)
