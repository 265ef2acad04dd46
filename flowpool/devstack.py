"""A whole flowpool on one machine: Redis, workers and the API as child processes.

`flowpool dev` runs one; the tests and the benchmark start theirs the same
way, so what they exercise is what a user runs.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Sequence

import requests

from . import devstate, keys
from .devstate import KEY_FILE, REDIS_DIR, shown_url
from .errors import AuthenticationError, ConfigurationError
from .procs import bind_error, free_port, interrupt_once, set_parent_death_signal, url_host
from .redis_server import RedisServer
from .settings import Settings

__all__ = ["Stack", "DevStack"]


class Stack:
    """Child processes of one flowpool installation, sharing one environment."""

    def __init__(self, env: dict[str, str] | None = None, redis_url: str | None = None,
                 output: IO[bytes] | None = None, redis_dir: Path | None = None, own_session: bool = False) -> None:
        self.output = output  # where the processes write, unless quiet; None: this process's own stdout/stderr
        # own_session: each process (Redis too) in a session of its own, out of the terminal's process group, so a
        # Ctrl-C reaches only the process that owns the stack, which stops them (they still die with it).
        self.own_session = own_session
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
        self.env.update(env or {})
        self.redis: RedisServer | None = None
        if redis_url is None and not self.env.get("FLOWPOOL_REDIS_URL"):
            # With redis_dir the Redis started here persists there; without, it keeps nothing.
            self.redis = RedisServer(data_dir=redis_dir, own_session=own_session).start()
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
            start_new_session=self.own_session,
        )
        self.processes.append(process)
        return process

    def start_worker(self, *args: str, env: dict[str, str] | None = None, quiet: bool = False) -> subprocess.Popen[bytes]:
        return self.spawn("worker", *args, env=env, quiet=quiet)

    def start_api(self, port: int | None = None, host: str = "127.0.0.1", quiet: bool = False) -> str:
        port = port or free_port(host)
        self.spawn("api", "--host", host, "--port", str(port), quiet=quiet)
        self.api_url = f"http://{url_host(host)}:{port}"
        return self.api_url

    def wait_ready(self, timeout: float = 60.0, workers: int = 1, names: Sequence[str] = ()) -> None:
        """Wait until the API answers /readyz with at least ``workers`` workers, and each worker named in ``names``
        has sent a heartbeat since the wait began.

        ``names`` is for a worker started in place of one killed outright: the dead one's last heartbeat counts
        in /readyz until the worker TTL passes, so the count alone can be met before the new one serves.
        """
        assert self.api_url is not None
        began = time.time()  # the workers' heartbeats are wall-clock times
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[4:]} exited with {process.returncode} during start-up")
            try:
                # Connection: close: an idle keep-alive connection left behind would hold a gevent API worker's
                # graceful shutdown for its keep-alive time (5 s) when the stack stops.
                response = requests.get(self.api_url + "/readyz", timeout=2, headers={"Connection": "close"})
                last = response.json()
                if response.status_code == 200 and last["checks"]["workers"] >= workers:
                    silent = self._not_beating_since(names, began)
                    if not silent:
                        return
                    last = f"{last}, and no heartbeat yet from {', '.join(silent)}"
            except requests.RequestException as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"the stack was not ready within {timeout}s: {last}")

    def _not_beating_since(self, names: Sequence[str], since: float) -> list[str]:
        """Those of the workers ``names`` without a heartbeat at or after ``since`` (unix time)."""
        if not names:
            return []
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            beats = [client.zscore(keys.WORKERS, name) for name in names]
        finally:
            client.close()
        return [name for name, beat in zip(names, beats) if beat is None or beat < since]

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


def _flowpool_command() -> str:
    """How a shell runs this flowpool without its venv activated: the script beside this interpreter (the
    venv's bin), else the interpreter itself with ``-m flowpool.cli``."""
    script = Path(sys.executable).parent / "flowpool"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m flowpool.cli"


class DevStack:
    """`flowpool dev`: run a stack in the foreground until Ctrl-C, keeping its data across restarts.

    Its data directory holds the Redis data (unless FLOWPOOL_REDIS_URL names a
    Redis) and the dev account's API key, reused while it still authenticates,
    so a restart brings back the same key and every account, workflow and run.
    One dev at a time uses a directory: it holds a lock on it while it runs,
    and records there where it serves, for the other commands (flowpool.devstate).
    """

    def __init__(self, settings: Settings, host: str, port: int, flower: bool, reset: bool = False,
                 flower_port: int = 5555) -> None:
        self.settings = settings
        self.host, self.port, self.flower, self.reset = host, port, flower, reset
        self.flower_port = flower_port
        self._flower_password: str | None = None  # made up as Flower starts
        self.data_dir = devstate.resolve(settings.data_dir)

    def run(self) -> None:
        # Set here, whatever dev inherited: started from a script (`flowpool dev &` in a shell without job
        # control) or by a parent that ignores SIGINT, dev finds SIGINT ignored, and Python leaves it so;
        # `kill -INT` and Ctrl-C would then do nothing. The processes dev starts get the default back at exec.
        # SIGINT or SIGTERM: stop, once (the second signal of a Ctrl-C sent to the whole group does nothing).
        signal.signal(signal.SIGINT, interrupt_once)
        signal.signal(signal.SIGTERM, interrupt_once)
        if self.flower and importlib.util.find_spec("flower") is None:
            print("flowpool dev: --flower needs Flower: pip install 'flowpool[flower]'", file=sys.stderr)
            sys.exit(2)
        lock = self._claim_data_dir()
        try:
            self._run()
        except KeyboardInterrupt:  # before its stack was started
            print("\nflowpool dev: stopping", flush=True)
        finally:
            os.close(lock)

    def _run(self) -> None:
        devstate.forget(self.data_dir)  # a record left by a dev that was killed: no dev serves there now
        if self.reset:
            self._wipe_data_dir()
        # Checked before anything starts, so that a refusal leaves nothing running.
        self._check_port()
        self._check_flower_port()
        self._check_redis_url()
        redis_dir = None if self.settings.redis_url else self.data_dir / REDIS_DIR
        try:
            # Stack keeps the caller's FLOWPOOL_* variables from its children; dev hands them its settings.
            stack = Stack(env=_settings_env(self.settings), redis_url=self.settings.redis_url, redis_dir=redis_dir)
        except ConfigurationError as exc:
            print(f"flowpool dev: {exc}" + ("\n`flowpool dev --reset` starts afresh" if redis_dir else ""),
                  file=sys.stderr)
            sys.exit(1)
        try:
            shown = shown_url(stack.redis_url)
            where = f"started on {shown}, data in {redis_dir}" if stack.redis else f"at {shown}"
            print(f"flowpool dev: Redis {where}", flush=True)
            # Flower shows only what workers report as task events.
            stack.start_worker(env={"FLOWPOOL_WORKER_EVENTS": "true"} if self.flower else None)
            api_url = stack.start_api(port=self.port, host=self.host)
            api_process = stack.processes[-1]
            try:
                stack.wait_ready(timeout=120)
            except RuntimeError as exc:
                # Another server may have taken the port since _check_port: the API then exits at start-up.
                if api_process.poll() is not None and self._port_taken():
                    self._say_port_taken()
                else:
                    print(f"flowpool dev: {exc}; stopping", file=sys.stderr, flush=True)
                sys.exit(1)
            if self.flower:
                self._start_flower(stack)
            key = self._api_key(stack)
            devstate.record(self.data_dir, api_url, stack.redis_url)
            print(self._banner(api_url, stack.redis_url, key), flush=True)
            while True:
                for process in stack.processes:
                    if process.poll() is not None:
                        print(f"flowpool dev: {' '.join(map(str, process.args[3:]))} exited "
                              f"({process.returncode}); stopping", file=sys.stderr, flush=True)
                        sys.exit(1)  # after the finally below: a supervisor sees dev fail, not end
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nflowpool dev: stopping", flush=True)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            devstate.forget(self.data_dir)  # first: the other commands stop sending to what is going away
            stack.stop()

    def _claim_data_dir(self) -> int:
        """Create the data directory and lock it for this dev; the descriptor that holds the lock.

        Two servers appending to one AOF would corrupt it. The lock goes with
        this process, however it ends, and its children do not inherit it.
        """
        lock = devstate.claim(self.data_dir)
        if lock is None:
            print(f"flowpool dev: {self.data_dir} is in use by another flowpool dev; stop that one first, "
                  "or give this one its own FLOWPOOL_DATA_DIR", file=sys.stderr)
            sys.exit(2)
        return lock

    def _port_taken(self) -> bool:
        error = bind_error(self.host, self.port)
        return error is not None and error.errno == errno.EADDRINUSE

    def _say_port_taken(self) -> None:
        free = next((port for port in range(self.port + 1, min(self.port + 100, 65536))
                     if bind_error(self.host, port) is None), None)
        hint = f" (e.g. --port {free})" if free else ""
        print(f"flowpool dev: port {self.port} on {self.host} is in use by another server; pass --port N{hint}",
              file=sys.stderr, flush=True)

    def _check_port(self) -> None:
        """Exit with one line, before anything starts, when the API could not listen where it is asked to."""
        error = bind_error(self.host, self.port)
        if error is None:
            return
        if getattr(error, "errno", None) == errno.EADDRINUSE:
            self._say_port_taken()
        else:
            print(f"flowpool dev: the API cannot listen on {self.host}:{self.port}: {error}", file=sys.stderr)
        sys.exit(1)

    def _check_flower_port(self) -> None:
        """Exit with one line, before anything starts, when Flower could not listen on --flower-port."""
        error = bind_error(self.host, self.flower_port) if self.flower else None
        if error is not None:
            print(f"flowpool dev: Flower cannot listen on {self.host}:{self.flower_port}: {error}; "
                  "pass --flower-port with a free port", file=sys.stderr)
            sys.exit(1)

    def _start_flower(self, stack: Stack) -> None:
        """Start Flower on --flower-port, behind a password made up now, once the worker answers remote control."""
        from celery import Celery

        # Flower asks the workers for their stats, queues and configuration as it starts, by broadcast. On Redis a
        # broadcast reaches only the workers listening at that moment, and a worker listens a moment after its
        # heartbeat made the API ready: a Flower started beside the worker heard from none and logged
        # "Inspect method ... failed" for each question. So it starts once a ping, a broadcast too, is answered.
        app = Celery("flowpool-dev", broker=self.settings.broker_url or stack.redis_url, set_as_current=False)
        deadline = time.monotonic() + 30
        try:
            while not app.control.ping(timeout=0.5):
                if time.monotonic() > deadline:
                    print("flowpool dev: the worker does not answer remote control; Flower will not see it",
                          file=sys.stderr, flush=True)
                    break
        finally:
            app.close()
        # Flower 2 serves its API only with authentication, or to anyone (FLOWER_UNAUTHENTICATED_API, which also
        # answers every web page's cross-origin requests: any site open in the developer's browser could read the
        # runs' inputs and shut the worker down). So basic auth, which also makes Flower refuse cross-site requests.
        self._flower_password = secrets.token_urlsafe(12)
        # In the environment, not the command line, which every local user can read.
        env = {**stack.env, "FLOWER_BASIC_AUTH": f"flowpool:{self._flower_password}"}
        stack.processes.append(subprocess.Popen(
            [sys.executable, "-I", "-m", "celery", "-A", "flowpool.tasks.celery_app", "flower",
             f"--address={self.host}", f"--port={self.flower_port}"],
            env=env, stdin=subprocess.DEVNULL, stdout=stack.output, stderr=stack.output,
            # Its own session: a Ctrl-C reaches the terminal's whole process group, and Flower, already stopping
            # on that SIGINT when dev's SIGTERM came, died of the SIGTERM in its exit handlers, with a traceback.
            # Out of the group, it gets dev's SIGTERM alone (and SIGKILL should dev die: set_parent_death_signal).
            start_new_session=True, preexec_fn=set_parent_death_signal))
        # The banner comes once Flower listens, so a run started as it shows is one Flower sees.
        address = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and stack.processes[-1].poll() is None:
            try:
                socket.create_connection((address, self.flower_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)

    def _check_redis_url(self) -> None:
        """Exit with one line when FLOWPOOL_REDIS_URL names a Redis that does not answer (one left exported
        from an earlier dev's banner, say), rather than waiting for workers that cannot start."""
        if not self.settings.redis_url:
            return
        import redis

        from .connections import connect_redis

        client = connect_redis(self.settings, socket_timeout=5)
        try:
            client.ping()
        except redis.RedisError as exc:
            shown = shown_url(self.settings.redis_url)
            print(f"flowpool dev: the Redis at FLOWPOOL_REDIS_URL ({shown}) does not answer: "
                  f"{exc}; start it, or unset FLOWPOOL_REDIS_URL and dev starts its own", file=sys.stderr)
            sys.exit(1)
        finally:
            client.close()

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

    def _api_key(self, stack: Stack) -> str:
        """The dev account's API key: the one kept in the data directory while it still authenticates, else a
        new one, kept there (mode 0600) for the next start."""
        from .connections import connect_redis
        from .registry import Accounts

        key_file = self.data_dir / KEY_FILE
        kept = key_file.read_text().strip() if key_file.exists() else ""
        if kept:
            client = connect_redis(self.settings, stack.redis_url)
            try:
                Accounts(client).authenticate(kept)
                return kept
            except AuthenticationError:
                pass  # that Redis lost its data, or FLOWPOOL_REDIS_URL names another one
            finally:
                client.close()
        key = stack.create_account("dev")
        devstate.write_private(key_file, key + "\n")
        return key

    @staticmethod
    def _push_line() -> str:
        """The banner's push: the checkout's echo example by its full path, so it runs from any directory; where
        dev runs outside a checkout, a one-line workflow written first."""
        example = Path.cwd() / "examples" / "echo.py"
        if example.is_file():
            return f"{_flowpool_command()} push {shlex.quote(str(example))} --name echo"
        script = 'def execute(ctx):\\n    text = ctx.input["text"]\\n    return {"echo": text, "words": len(text.split())}\\n'
        return f"printf '{script}' > echo.py && {_flowpool_command()} push echo.py --name echo"

    def _banner(self, api_url: str, redis_url: str, key: str) -> str:
        flower = (f"\n  Flower:   http://{url_host(self.host)}:{self.flower_port}  (user flowpool, password "
                  f"{self._flower_password})") if self.flower else ""
        kept = "the API key (the data is in the Redis at FLOWPOOL_REDIS_URL)" if self.settings.redis_url \
            else "Redis data and the API key"
        # The commands find this dev through its data directory (flowpool.devstate), with nothing exported.
        where = f"with FLOWPOOL_DATA_DIR={self.data_dir}" if "data_dir" in self.settings.model_fields_set \
            else f"in {Path.cwd()}"
        found = f"the flowpool commands run {where} find this dev"
        export = f"export FLOWPOOL_API_URL={api_url} FLOWPOOL_API_KEY={key}"
        if shown_url(redis_url) == redis_url:
            export += f" FLOWPOOL_REDIS_URL={redis_url}"
        else:  # never printed: a comment, so the lines still run as printed
            export += ("\n  # FLOWPOOL_REDIS_URL is left out: it holds a password; export it yourself for "
                       "`flowpool accounts` and `flowpool doctor`")
        console = f"\n  Console:  {api_url}/console  (sign in with the API key)" if self.settings.console_enabled else ""
        return f"""
flowpool is running.
  API:      {api_url}{console}
  Redis:    {shown_url(redis_url)}{flower}
  API key:  {key}
  Data:     {self.data_dir}: {kept}, kept across restarts; `flowpool dev --reset` wipes it

Try it ({found}; from elsewhere, run the export line first):
  {export}
  {self._push_line()}
  curl -s {api_url}/workflow/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "workflow:echo", "input": {{"text": "hello flowpool"}}}}'

Ctrl-C stops everything.
"""
