"""Helpers shared by the tests: an HTTP client of the test stack, error-envelope checks, a ``flowpool dev`` process."""
from __future__ import annotations

import base64
import json
import marshal
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import psutil
import pytest
import redis
import requests

from flowpool.run import UNENDED
from flowpool.sandbox.backends import Backend, bwrap_binary, probe_bwrap


def running(process: psutil.Process) -> bool:
    """Whether a process is alive and not a zombie (a process that is gone just now is not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def fail_on_leftovers(leaked: list[psutil.Process], name: Callable[[psutil.Process], Any]) -> None:
    """Give processes a test left 5 s to end; kill those still there and fail the test, naming each."""
    if not leaked:
        return
    _, still = psutil.wait_procs(leaked, timeout=5)
    if still:
        names = [name(p) for p in still]
        for proc in still:
            proc.kill()
        pytest.fail(f"test left processes behind: {names}")


def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """The first true value of ``check()``, polled; fails the test, saying ``what``, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what or check}")
        time.sleep(0.05)


class Client:
    """An HTTP client of the test stack, authenticated as one account."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url
        self.key = key
        self.session = requests.Session()
        self.session.headers["x-api-key"] = key

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.session.request(method, self.base_url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def upload(self, ref: str, script: str, **fields: Any) -> dict[str, Any]:
        """Upload a script (dedented) and return the ``data`` of the answer; fails the test on error."""
        response = self.post("/api/v1/workflows/upload",
                             json={"workflow_ref_name": ref, "script": textwrap.dedent(script), **fields})
        assert response.status_code in (200, 201), response.text
        return response.json()["data"]

    def invoke(self, ref: str, **body: Any) -> requests.Response:
        """POST /workflow/chat/completions with ``model=workflow:<ref>``."""
        body.setdefault("model", f"workflow:{ref}")
        if "input" not in body and "messages" not in body:
            body["input"] = {}
        return self.post("/workflow/chat/completions", json=body)

    def run(self, request_id: str) -> dict[str, Any]:
        response = self.get(f"/api/v1/runs/{request_id}")
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def ended(self, request_id: str) -> dict[str, Any]:
        """The run once it has ended (GET /api/v1/runs/<id>?wait=30); fails the test if it has not by then."""
        response = self.get(f"/api/v1/runs/{request_id}?wait=30", timeout=60)
        assert response.status_code == 200, response.text
        run = response.json()["data"]
        assert run["status"] not in UNENDED, run
        return run


class DevProcess:
    """One ``flowpool dev`` in its own session (process group), its output read as it comes.

    What differs between tests is passed in: the working directory, dev's arguments after ``--port``,
    the interpreter's flags, the environment, the port, and what runs in the child before dev
    (``preexec_fn``: e.g. ignoring SIGINT, as a script's ``flowpool dev &`` does). A subclass may wait for
    another line of the banner (``_banner_printed``) and parse more of it (``wait_for_banner``).
    """

    def __init__(self, port: int, *, cwd: str | Path, env: Mapping[str, str], args: Sequence[str] = (),
                 python_flags: Sequence[str] = (), preexec_fn: Callable[[], Any] | None = None) -> None:
        self.port = port
        self.api_url = f"http://127.0.0.1:{port}"
        self.key = ""
        self.process = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "flowpool.cli", "dev", "--port", str(port), *args],
            env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True, preexec_fn=preexec_fn)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        # Drained to the end: the worker shares this pipe and would block on a full one.
        self._reader = threading.Thread(target=self._read, name="flowpool-dev-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def _banner_printed(self, line: str) -> bool:
        """Whether ``line`` shows that the banner is out (up to what this class parses of it)."""
        return line.startswith("Ctrl-C stops everything")

    def wait_for_banner(self, timeout: float = 90) -> Client:
        """Wait until dev printed its banner and parse its key; a client of its API with that key."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(self._banner_printed(line) for line in self.lines):
                if self.process.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"flowpool dev exited with {self.process.returncode}:\n{self.output}")
                if not self._changed.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    pytest.fail(f"flowpool dev printed no banner within {timeout}s:\n{self.output}")
        self.key = re.search(r"^\s+API key:\s+(\S+)$", self.output, re.M).group(1)  # type: ignore[union-attr]
        return Client(self.api_url, self.key)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, as a service manager stops it; it must end cleanly and leave nothing behind."""
        left = self.descendants()
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout) == 0, self.output
        _, still = psutil.wait_procs(left, timeout=10)
        assert not still, f"flowpool dev left {still} behind"

    def kill(self) -> None:
        """Kill dev and everything it started (for a test that failed before stopping it)."""
        left = self.descendants()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)


def error_of(response: requests.Response) -> dict[str, Any]:
    """The ``error`` object of an error answer, checking its envelope."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == response.status_code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def console_session(base_url: str, key: str) -> requests.Session:
    """A requests session signed in to the web console with ``key``, its CSRF token in ``X-CSRF-Token``.

    The cookie is sent on every later request (its Path is /console); the token is read from a page's
    ``<meta name="csrf-token">``, as console.js reads it.
    """
    session = requests.Session()
    signed = session.post(f"{base_url}/console/sign-in", data={"api_key": key, "next": "/console/workflows"},
                          allow_redirects=False, timeout=30)
    assert signed.status_code == 303, (signed.status_code, signed.text[:500])
    page = session.get(f"{base_url}/console/sign-in", allow_redirects=True, timeout=30)
    token = _CSRF_META.search(page.text)
    assert token, f"no csrf-token meta in {page.url}: {page.text[:500]}"
    session.headers["X-CSRF-Token"] = token.group(1)
    return session


def _with_message_bodies(values: Iterator[bytes]) -> Iterator[bytes]:
    """Each value, and after a Celery (kombu) message its body decoded: the body travels base64-encoded."""
    for value in values:
        yield value
        if not value.startswith((b"{", b"[")) or b'"body"' not in value:
            continue
        try:
            message = json.loads(value)
        except ValueError:
            continue
        if isinstance(message, list):  # the unacked hash keeps [message, exchange, routing key]
            message = message[0] if message and isinstance(message[0], dict) else {}
        body = message.get("body") if isinstance(message, dict) else None
        if isinstance(body, str) and message.get("properties", {}).get("body_encoding") == "base64":
            yield base64.b64decode(body)


def compiled(source: str) -> bytes:
    """A script as the worker hands it to the sandbox: marshalled code of ``workflow.py``."""
    return marshal.dumps(compile(textwrap.dedent(source), "workflow.py", "exec"))


def every_value_in(server: Any) -> Iterator[bytes]:
    """Every key name and every stored value of every database of ``server``, Celery message bodies decoded."""
    return _with_message_bodies(_every_raw_value_in(server))


def _every_raw_value_in(server: Any) -> Iterator[bytes]:
    first = redis.Redis(port=server.port)
    try:
        databases = int(first.config_get("databases")["databases"])
    finally:
        first.close()
    for db in range(databases):
        store = redis.Redis(port=server.port, db=db)
        try:
            for key in store.scan_iter(count=1000):
                yield key
                kind = store.type(key)
                if kind == b"string":
                    value = store.get(key)
                    if value is not None:
                        yield value
                elif kind == b"hash":
                    for field, value in store.hgetall(key).items():
                        yield field
                        yield value
                elif kind == b"list":
                    yield from store.lrange(key, 0, -1)
                elif kind == b"set":
                    yield from store.smembers(key)
                elif kind == b"zset":
                    yield from store.zrange(key, 0, -1)
                elif kind == b"stream":
                    for _, fields in store.xrange(key):
                        for field, value in fields.items():
                            yield field
                            yield value
                elif kind != b"none":  # the key expired between SCAN and TYPE
                    raise AssertionError(f"unexpected Redis type {kind!r} of {key!r}")
        finally:
            store.close()


# The command line, run as a user runs it: a real subprocess.

REPO = Path(__file__).resolve().parents[1]


def run_flowpool(*args: str, env: Mapping[str, str], cwd: str | Path = REPO, timeout: float = 120,
                 ) -> subprocess.CompletedProcess[str]:
    """Run ``flowpool ARGS`` to its end in ``cwd`` with exactly ``env``. ``-I``: neither the working directory
    nor a PYTHON* variable can change what is imported."""
    return subprocess.run([sys.executable, "-I", "-m", "flowpool.cli", *args], cwd=cwd, env=dict(env),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded (else the test fails, showing both outputs)."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def doctor_checks(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """``{check: (ok|BAD, value)}`` of ``flowpool doctor``'s stdout, which holds nothing but those lines."""
    checks = {}
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"(ok |BAD) (.{16}) ?(.*)", line)
        assert match, f"unexpected doctor line {line!r} in:\n{result.stdout}"
        checks[match.group(2).strip()] = (match.group(1).strip(), match.group(3))
    return checks


class CannedHTTPServer:
    """A loopback HTTP server that answers every request with the same raw bytes, then closes the connection;
    it keeps each request's head (the request line and the headers), to check what a client sent."""

    def __init__(self, answer: bytes, host: str = "127.0.0.1") -> None:
        import socketserver

        self.answer = answer
        self.heads: list[str] = []
        server = self

        class _Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = self.rfile.readline(65536)
                    if not line:
                        return
                    head += line
                text = head.decode("latin-1")
                length = re.search(r"^content-length:\s*(\d+)", text, re.I | re.M)
                if length:
                    self.rfile.read(int(length.group(1)))
                server.heads.append(text)
                self.wfile.write(server.answer)

        self._server = socketserver.ThreadingTCPServer((host, 0), _Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="canned-http", daemon=True)

    def __enter__(self) -> CannedHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


class SilentServer:
    """A loopback port that takes connections (the kernel's backlog completes them) and never answers: what a
    client's read timeout is for."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        import socket

        self._socket = socket.create_server((host, 0), backlog=16)
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._socket.close()


# Workflows several test modules run: one that fails in a function of its own (its traceback names
# `divide`, line 2), one past its 1 s time limit, one that echoes its input's text.
FAILING_WORKFLOW = """\
def divide(x):
    return 1 / x


def execute(ctx):
    ctx.log.info("dividing", by=0)
    ctx.emit("step", 1)
    return divide(0)
"""

SLEEPING_WORKFLOW = """\
import time

TIMEOUT_SECONDS = 1


def execute(ctx):
    time.sleep(30)
    return 1
"""

ECHO_WORKFLOW = """\
def execute(ctx):
    return {"echo": ctx.input["text"]}
"""


# The process backend as it runs in a container whose root lacks CAP_SYS_ADMIN: a uid per
# slot still, but no network namespace and no per-run namespaces.
WITHOUT_SYS_ADMIN = Backend("process", ("setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--"))


def sandbox_backends() -> list[Any]:
    """Each sandbox backend this host can run, as pytest params: process, bwrap, and process without CAP_SYS_ADMIN."""
    import shutil

    problem = probe_bwrap(bwrap_binary())
    return [
        "process",
        pytest.param("bwrap", marks=pytest.mark.skipif(problem is not None, reason=str(problem))),
        pytest.param(WITHOUT_SYS_ADMIN, id="process-without-sys-admin",
                     marks=pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv here")),
    ]


def sse_events(response: requests.Response, comments: bool = False) -> Iterator[dict[str, Any]]:
    """The SSE events of ``response`` as they arrive: ``event`` (when named), ``id`` and ``data`` (JSON, or
    ``"[DONE]"``); with ``comments``, each comment line too, as ``{"comment": line}``."""
    event: dict[str, Any] = {}
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith(":"):
            if comments:
                yield {"comment": line}
        elif line.startswith("event: "):
            event["event"] = line[7:]
        elif line.startswith("id: "):
            event["id"] = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
            event["data"] = data if data == "[DONE]" else json.loads(data)
        elif not line and event:
            yield event
            event = {}


def account_id(db: redis.Redis, client: Client) -> str:
    """The id of the account whose key ``client`` sends."""
    from flowpool.registry import Accounts

    return Accounts(db).authenticate(client.key).id
