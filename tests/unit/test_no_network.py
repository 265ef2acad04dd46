"""The sandbox's no-network hint: a message on the errors the barrier raises, never a barrier or a break itself.

Each test runs in a fresh interpreter, because :func:`install` changes the
socket module of the process it runs in.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from flowpool.sandbox import seccomp


def _python(code: str) -> Any:
    """What ``code``, run in a fresh interpreter, printed as JSON."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not seccomp.available(), reason="no seccomp filter for this architecture")
def test_a_refused_socket_says_the_sandbox_has_no_network_and_stays_refused() -> None:
    found = _python("""
        import _socket, json, socket
        from flowpool.sandbox import no_network, seccomp

        seccomp.install()  # the barrier, as a run process has it
        no_network.install()
        found = {}
        for name, attempt in {"socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
                              "_socket": lambda: _socket.socket(socket.AF_INET, socket.SOCK_STREAM)}.items():
            try:
                attempt()
                found[name] = "made"
            except OSError as exc:
                found[name] = [type(exc).__name__, exc.errno, str(exc)]
        print(json.dumps(found))
    """)

    assert found["socket"][:2] == ["PermissionError", 1]
    assert found["socket"][2].startswith("[Errno 1] Operation not permitted: the workflow sandbox has no network; ")
    assert "ctx.http.get(url)" in found["socket"][2]
    # Below the wrapper the filter refuses the same call, with the kernel's bare message.
    assert found["_socket"] == ["PermissionError", 1, "[Errno 1] Operation not permitted"]


def test_what_works_without_the_barrier_works_the_same_with_the_hint() -> None:
    found = _python("""
        import json, socket
        from flowpool.sandbox import no_network

        no_network.install()
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
        client.sendall(b"ping")
        a, b = socket.socketpair()
        a.sendall(b"pair")
        found = {"tcp": accepted.recv(4).decode(), "pair": b.recv(4).decode(),
                 "is_a_socket": isinstance(socket.socket(fileno=b.detach()), socket.socket),
                 "numeric": socket.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)[0][4][0]}
        try:
            socket.getaddrinfo("127.0.0.1", "no-such-service-for-flowpool")  # read from /etc/services, no DNS
        except socket.gaierror as exc:
            found["lookup"] = [type(exc).__name__, exc.errno is not None, str(exc)]
        try:
            import requests_of_flowpool_tests  # noqa: F401  (no such module anywhere)
        except ModuleNotFoundError as exc:
            found["unknown module"] = str(exc)
        try:
            import pycurl  # noqa: F401  (an HTTP client this environment does not have)
        except ModuleNotFoundError as exc:
            found["http client"] = [exc.name, str(exc)]
        import importlib.util
        found["probed"] = importlib.util.find_spec("pycurl") is None  # libraries probe optional clients so
        print(json.dumps(found))
    """)

    assert (found["tcp"], found["pair"], found["is_a_socket"], found["numeric"]) == ("ping", "pair", True, "127.0.0.1")
    kind, has_errno, message = found["lookup"]
    assert kind == "gaierror" and has_errno
    assert "(looking up '127.0.0.1'): the workflow sandbox has no network; " in message
    # Only the HTTP clients' imports carry the hint; any other missing module reads as Python says it.
    assert found["unknown module"] == "No module named 'requests_of_flowpool_tests'"
    name, message = found["http client"]
    assert name == "pycurl" and message.startswith("No module named 'pycurl': the workflow sandbox has no network")
    assert found["probed"] is True  # a probe for an optional client is answered, not raised at
