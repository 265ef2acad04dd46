"""A whole flowpool on one machine: Redis, workers and the API as child processes.

`flowpool dev` runs one; the tests and the benchmark start theirs the same
way, so what they exercise is what a user runs.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import requests

from .errors import AuthenticationError, ConfigurationError
from .procs import free_port, set_parent_death_signal
from .redis_server import RedisServer
from .settings import Settings

__all__ = ["Stack", "DevStack"]


class Stack:
    """Child processes of one flowpool installation, sharing one environment."""

    def __init__(self, env: dict[str, str] | None = None, redis_url: str | None = None,
                 output: IO[bytes] | None = None, redis_dir: Path | None = None) -> None:
        self.output = output  # where the processes write, unless quiet; None: this process's own stdout/stderr
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
        self.env.update(env or {})
        self.redis: RedisServer | None = None
        if redis_url is None and not self.env.get("FLOWPOOL_REDIS_URL"):
            # With redis_dir the Redis started here persists there; without, it keeps nothing.
            self.redis = RedisServer(data_dir=redis_dir).start()
            redis_url = self.redis.url
        if redis_url is not None:
            self.env["FLOWPOOL_REDIS_URL"] = redis_url
        self.redis_url = self.env["FLOWPOOL_REDIS_URL"]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.api_url: str | None = None

    def spawn(self, *args: str, env: dict[str, str] | None = None, quiet: bool = False) -> subprocess.Popen[bytes]:
        """Start ``flowpool ARGS`` with this stack's environment."""
        output = subprocess.DEVNULL if quiet else self.output
        # -I: the working directory is not put on sys.path, so a file there
        # named like a module (redis.py, amqp.py...) cannot shadow it.
        process = subprocess.Popen(
            [sys.executable, "-I", "-m", "flowpool.cli", *args], env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, preexec_fn=set_parent_death_signal,
        )
        self.processes.append(process)
        return process

    def start_worker(self, *args: str, env: dict[str, str] | None = None, quiet: bool = False) -> subprocess.Popen[bytes]:
        return self.spawn("worker", *args, env=env, quiet=quiet)

    def start_api(self, port: int | None = None, host: str = "127.0.0.1", quiet: bool = False) -> str:
        port = port or free_port(host)
        self.spawn("api", "--host", host, "--port", str(port), quiet=quiet)
        self.api_url = f"http://{host}:{port}"
        return self.api_url

    def wait_ready(self, timeout: float = 60.0, workers: int = 1) -> None:
        """Wait until the API answers /readyz with at least ``workers`` workers."""
        assert self.api_url is not None
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[4:]} exited with {process.returncode} during start-up")
            try:
                response = requests.get(self.api_url + "/readyz", timeout=2)
                last = response.json()
                if response.status_code == 200 and last["checks"]["workers"] >= workers:
                    return
            except requests.RequestException as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"the stack was not ready within {timeout}s: {last}")

    def start(self, quiet: bool = True) -> Stack:
        """Start one worker and the API, and wait until they are ready; stops everything if that fails."""
        try:
            self.start_worker(quiet=quiet)
            self.start_api(quiet=quiet)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def create_account(self, name: str) -> str:
        """A new API key for account ``name``."""
        import redis

        from .registry import Accounts

        client = redis.Redis.from_url(self.redis_url)
        try:
            return Accounts(client).create(name)[1]
        finally:
            client.close()

    def stop_process(self, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """Stop one process (TERM, then KILL after ``timeout``) and forget it."""
        if process in self.processes:
            self.processes.remove(process)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process (TERM, then KILL after ``timeout``) and the Redis server."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def _settings_env(settings: Settings) -> dict[str, str]:
    """The FLOWPOOL_* variables that give a child process the settings that were set explicitly."""
    return {f"FLOWPOOL_{name.upper()}": str(value)
            for name, value in settings.model_dump(exclude_unset=True).items() if value is not None}


# What `flowpool dev` keeps in its data directory (FLOWPOOL_DATA_DIR); --reset removes these and nothing else,
# so a data directory pointed at a folder holding other files never loses them.
REDIS_DIR = "redis"
KEY_FILE = "dev-key"


class DevStack:
    """`flowpool dev`: run a stack in the foreground until Ctrl-C, keeping its data across restarts.

    Its data directory holds the Redis data (unless FLOWPOOL_REDIS_URL names a
    Redis) and the dev account's API key, reused while it still authenticates,
    so a restart brings back the same key and every account, workflow and run.
    One dev at a time uses a directory: it holds a lock on it while it runs.
    """

    def __init__(self, settings: Settings, host: str, port: int, flower: bool, reset: bool = False) -> None:
        self.settings = settings
        self.host, self.port, self.flower, self.reset = host, port, flower, reset
        self.data_dir = Path(settings.data_dir).expanduser().resolve()

    def run(self) -> None:
        if self.flower and importlib.util.find_spec("flower") is None:
            print("flowpool dev: --flower needs Flower: pip install 'flowpool[flower]'", file=sys.stderr)
            sys.exit(2)
        lock = self._claim_data_dir()
        try:
            self._run()
        finally:
            os.close(lock)

    def _run(self) -> None:
        if self.reset:
            self._wipe_data_dir()
        redis_dir = None if self.settings.redis_url else self.data_dir / REDIS_DIR
        try:
            # Stack keeps the caller's FLOWPOOL_* variables from its children; dev hands them its settings.
            stack = Stack(env=_settings_env(self.settings), redis_url=self.settings.redis_url, redis_dir=redis_dir)
        except ConfigurationError as exc:
            print(f"flowpool dev: {exc}" + ("\n`flowpool dev --reset` starts afresh" if redis_dir else ""),
                  file=sys.stderr)
            sys.exit(1)
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            if stopping:
                return
            stopping = True
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            where = f"started on {stack.redis_url}, data in {redis_dir}" if stack.redis else f"at {stack.redis_url}"
            print(f"flowpool dev: Redis {where}", flush=True)
            # Flower shows only what workers report as task events.
            stack.start_worker(env={"FLOWPOOL_WORKER_EVENTS": "true"} if self.flower else None)
            api_url = stack.start_api(port=self.port, host=self.host)
            if self.flower:
                stack.processes.append(subprocess.Popen(
                    [sys.executable, "-I", "-m", "celery", "-A", "flowpool.tasks.celery_app", "flower", "--port=5555"],
                    env=stack.env, stdin=subprocess.DEVNULL, preexec_fn=set_parent_death_signal))
            stack.wait_ready(timeout=120)
            key = self._api_key(stack.redis_url)
            print(self._banner(api_url, stack.redis_url, key), flush=True)
            while True:
                for process in stack.processes:
                    if process.poll() is not None:
                        print(f"flowpool dev: {' '.join(map(str, process.args[3:]))} exited "
                              f"({process.returncode}); stopping", file=sys.stderr, flush=True)
                        return
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nflowpool dev: stopping", flush=True)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            stack.stop()

    def _claim_data_dir(self) -> int:
        """Create the data directory and lock it for this dev; the descriptor that holds the lock.

        Two servers appending to one AOF would corrupt it. The lock goes with
        this process, however it ends, and its children do not inherit it.
        """
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            print(f"flowpool dev: {self.data_dir} is in use by another flowpool dev; stop that one first, "
                  "or give this one its own FLOWPOOL_DATA_DIR", file=sys.stderr)
            sys.exit(2)
        return lock

    def _wipe_data_dir(self) -> None:
        """--reset: remove the Redis data and the API key kept in the data directory."""
        kept = [self.data_dir / name for name in (REDIS_DIR, KEY_FILE) if (self.data_dir / name).exists()]
        for path in kept:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        what = " and ".join({REDIS_DIR: "Redis data", KEY_FILE: "API key"}[path.name] for path in kept)
        said = f"removed {self.data_dir} ({what})" if kept else f"{self.data_dir} held nothing to remove"
        if self.settings.redis_url:
            said += "; the Redis at FLOWPOOL_REDIS_URL keeps its data"
        print(f"flowpool dev: --reset: {said}", flush=True)

    def _api_key(self, redis_url: str) -> str:
        """The dev account's API key: the one kept in the data directory while it still authenticates, else a
        new one, kept there (mode 0600) for the next start."""
        import redis

        from .registry import Accounts

        key_file = self.data_dir / KEY_FILE
        client = redis.Redis.from_url(redis_url)
        try:
            accounts = Accounts(client)
            kept = key_file.read_text().strip() if key_file.exists() else ""
            if kept:
                try:
                    accounts.authenticate(kept)
                    return kept
                except AuthenticationError:
                    pass  # that Redis lost its data, or FLOWPOOL_REDIS_URL names another one
            key = accounts.create("dev")[1]
        finally:
            client.close()
        written = key_file.with_name(KEY_FILE + ".new")
        descriptor = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)  # a file left from an interrupted write keeps its old mode otherwise
        with os.fdopen(descriptor, "w") as out:
            out.write(key + "\n")
        os.replace(written, key_file)
        return key

    def _banner(self, api_url: str, redis_url: str, key: str) -> str:
        flower = "\n  Flower:   http://127.0.0.1:5555" if self.flower else ""
        kept = "the API key (the data is in the Redis at FLOWPOOL_REDIS_URL)" if self.settings.redis_url \
            else "Redis data and the API key"
        return f"""
flowpool is running.
  API:      {api_url}
  Redis:    {redis_url}{flower}
  API key:  {key}
  Data:     {self.data_dir}: {kept}, kept across restarts; `flowpool dev --reset` wipes it

Try it:
  export FLOWPOOL_API_URL={api_url} FLOWPOOL_API_KEY={key}
  flowpool push examples/echo.py --name echo
  curl -s {api_url}/workflow/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "workflow:echo", "input": {{"text": "hello flowpool"}}}}'

Ctrl-C stops everything.
"""
