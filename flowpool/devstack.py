"""A whole flowpool on one machine: Redis, workers and the API as child processes.

`flowpool dev` runs one; the tests and the benchmark start theirs the same
way, so what they exercise is what a user runs.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from typing import IO, Any

import requests

from .procs import free_port, set_parent_death_signal
from .redis_server import RedisServer
from .settings import Settings

__all__ = ["Stack", "DevStack"]


class Stack:
    """Child processes of one flowpool installation, sharing one environment."""

    def __init__(self, env: dict[str, str] | None = None, redis_url: str | None = None,
                 output: IO[bytes] | None = None) -> None:
        self.output = output  # where the processes write, unless quiet; None: this process's own stdout/stderr
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
        self.env.update(env or {})
        self.redis: RedisServer | None = None
        if redis_url is None and not self.env.get("FLOWPOOL_REDIS_URL"):
            self.redis = RedisServer().start()
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


class DevStack:
    """`flowpool dev`: run a stack in the foreground until Ctrl-C."""

    def __init__(self, settings: Settings, host: str, port: int, flower: bool) -> None:
        self.settings = settings
        self.host, self.port, self.flower = host, port, flower

    def run(self) -> None:
        if self.flower and importlib.util.find_spec("flower") is None:
            print("flowpool dev: --flower needs Flower: pip install 'flowpool[flower]'", file=sys.stderr)
            sys.exit(2)
        # Stack keeps the caller's FLOWPOOL_* variables from its children; dev hands them its settings.
        stack = Stack(env=_settings_env(self.settings), redis_url=self.settings.redis_url)
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            if stopping:
                return
            stopping = True
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            where = "started on " + stack.redis_url if stack.redis else "at " + stack.redis_url
            print(f"flowpool dev: Redis {where}", flush=True)
            # Flower shows only what workers report as task events.
            stack.start_worker(env={"FLOWPOOL_WORKER_EVENTS": "true"} if self.flower else None)
            api_url = stack.start_api(port=self.port, host=self.host)
            if self.flower:
                stack.processes.append(subprocess.Popen(
                    [sys.executable, "-I", "-m", "celery", "-A", "flowpool.tasks.celery_app", "flower", "--port=5555"],
                    env=stack.env, stdin=subprocess.DEVNULL, preexec_fn=set_parent_death_signal))
            stack.wait_ready(timeout=120)
            key = stack.create_account("dev")
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

    def _banner(self, api_url: str, redis_url: str, key: str) -> str:
        flower = "\n  Flower:   http://127.0.0.1:5555" if self.flower else ""
        return f"""
flowpool is running.
  API:      {api_url}
  Redis:    {redis_url}{flower}
  API key:  {key}

Try it:
  export FLOWPOOL_API_URL={api_url} FLOWPOOL_API_KEY={key}
  flowpool push examples/echo.py --name echo
  curl -s {api_url}/workflow/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "workflow:echo", "input": {{"text": "hello flowpool"}}}}'

Ctrl-C stops everything.
"""
