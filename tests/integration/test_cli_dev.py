"""The command line finds ``flowpool dev`` by itself, doctor checks what it names, dev starts and stops cleanly.

One ``flowpool dev`` serves the module: started as a user starts it, in a
working directory of its own (where it keeps ``.flowpool/``). The commands are
run as a user runs them, in a fresh environment: no ``FLOWPOOL_*`` variable,
no venv activated.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import requests

from flowpool.devstack import Stack
from flowpool.procs import free_port
from tests.conftest import SESSION_PIDS
from tests.helpers import CannedHTTPServer, DevProcess, doctor_checks, ok, run_flowpool

REPO = Path(__file__).resolve().parents[2]
ECHO_EXAMPLE = REPO / "examples" / "echo.py"


def _fresh_env(home: Path, **settings: str) -> dict[str, str]:
    """What a new login shell has: a PATH without the venv, a HOME, no FLOWPOOL_* variable; plus ``settings``."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", **settings}


class Dev(DevProcess):
    """``flowpool dev`` in ``cwd`` with nothing set: its data in ``cwd/.flowpool``."""

    def __init__(self, cwd: Path, home: Path) -> None:
        super().__init__(free_port(), cwd=cwd, env=_fresh_env(home, FLOWPOOL_LOG_LEVEL="WARNING"),
                         python_flags=("-I",))
        self.cwd = cwd
        self.data_dir = cwd / ".flowpool"
        self.redis_url = ""

    def started(self) -> Dev:
        self.wait_for_banner()
        self.redis_url = re.search(r"^\s+Redis:\s+(\S+)$", self.output, re.M).group(1)  # type: ignore[union-attr]
        return self

    def try_lines(self) -> list[str]:
        """The banner's lines under "Try it", as printed."""
        lines = self.output.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("Try it"))
        end = lines.index("", start)
        return lines[start + 1:end]

    def accepts(self, key: str) -> bool:
        response = requests.get(self.api_url + "/api/v1/workflows", headers={"x-api-key": key}, timeout=30)
        assert response.status_code in (200, 401), response.text
        return response.status_code == 200


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[Dev]:
    cwd = tmp_path_factory.mktemp("project")
    dev = Dev(cwd, home)
    SESSION_PIDS.add(dev.process.pid)  # it and what it starts outlive each test of the module, on purpose
    try:
        yield dev.started()
        dev.stop()
    finally:
        dev.kill()
        SESSION_PIDS.discard(dev.process.pid)


# Every command finds the dev of its directory (or of its FLOWPOOL_DATA_DIR), with nothing exported.

@pytest.mark.slow
def test_accounts_create_run_where_dev_runs_writes_to_devs_redis_and_says_so(dev: Dev, home: Path,
                                                                              tmp_path: Path) -> None:
    made = run_flowpool("accounts", "create", "alice", cwd=dev.cwd, env=_fresh_env(home))
    key = ok(made).strip()
    assert f"Redis: {dev.redis_url} (from the flowpool dev running on {dev.data_dir})" in made.stderr, made.stderr
    assert "warning" not in made.stderr
    assert dev.accepts(key)  # written to dev's Redis: dev's API knows the key
    # From anywhere, with dev's FLOWPOOL_DATA_DIR.
    elsewhere = run_flowpool("accounts", "create", "bob", cwd=tmp_path,
                          env=_fresh_env(home, FLOWPOOL_DATA_DIR=str(dev.data_dir)))
    assert dev.accepts(ok(elsewhere).strip())
    record = dev.data_dir / "dev.json"
    assert json.loads(record.read_text()) == {"api_url": dev.api_url, "redis_url": dev.redis_url,
                                              "pid": dev.process.pid}
    assert stat.S_IMODE(record.stat().st_mode) == 0o600


@pytest.mark.slow
def test_push_invoke_and_runs_run_where_dev_runs_use_its_api_and_key(dev: Dev, home: Path) -> None:
    env = _fresh_env(home)
    shutil.copy(ECHO_EXAMPLE, dev.cwd / "found.py")
    assert re.fullmatch(r"found@\d+\.\d+\.\d+ \(new version\)\n", ok(run_flowpool("push", "found.py", "--name", "found",
                                                                                  cwd=dev.cwd, env=env)))
    invoked = ok(run_flowpool("invoke", "found", "--input", '{"text": "no exports"}', cwd=dev.cwd, env=env))
    assert json.loads(invoked) == {"echo": "no exports", "words": 2}
    assert ok(run_flowpool("runs", "found", cwd=dev.cwd, env=env)).strip()


def test_a_record_left_by_a_dev_that_is_gone_is_not_believed(stack: Stack, home: Path, tmp_path: Path) -> None:
    # What a dev killed outright leaves: its record and key, and no process holding the directory's lock.
    data_dir = tmp_path / ".flowpool"
    data_dir.mkdir()
    (data_dir / "dev.json").write_text(json.dumps({"api_url": stack.api_url, "redis_url": stack.redis_url,
                                                   "pid": 1}))
    (data_dir / "dev-key").write_text(stack.create_account("gone") + "\n")
    result = run_flowpool("runs", "anything", cwd=tmp_path, env=_fresh_env(home))
    assert result.returncode == 1
    assert "no API key: run this where `flowpool dev` runs" in result.stderr, result.stderr


# dev's record is all or nothing: a command never mixes dev's API, Redis or key with another installation's.

@pytest.mark.slow
def test_with_flowpool_redis_url_set_the_commands_use_neither_devs_api_nor_its_key(dev: Dev, home: Path) -> None:
    elsewhere = f"redis://127.0.0.1:{free_port()}/0"
    result = run_flowpool("runs", "anything", cwd=dev.cwd, env=_fresh_env(home, FLOWPOOL_REDIS_URL=elsewhere))
    assert result.returncode == 1
    assert "no API key" in result.stderr, result.stderr


@pytest.mark.slow
def test_with_flowpool_api_url_set_the_commands_use_neither_devs_redis_nor_its_key(
        dev: Dev, monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process: a command run so would go on to use the default Redis, which is not the tests' to touch.
    from flowpool.cli.common import load_cli_settings

    for name in [name for name in os.environ if name.startswith("FLOWPOOL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLOWPOOL_API_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.chdir(dev.cwd)
    loaded = load_cli_settings()
    assert loaded.dev is not None and loaded.dev.redis_url == dev.redis_url  # dev runs there, and is left alone
    assert loaded.from_dev == frozenset()
    assert (loaded.settings.redis_url, loaded.settings.api_key) == (None, None)
    where, warning = loaded.redis_source()
    assert where.endswith(" (the default)") and dev.redis_url not in where
    assert warning is not None and warning.startswith(f"FLOWPOOL_API_URL is set, so the flowpool dev running on "
                                                      f"{dev.data_dir} is not used"), warning


@pytest.mark.slow
def test_devs_key_never_goes_to_an_api_that_flowpool_api_url_names(dev: Dev, home: Path) -> None:
    ready = json.dumps({"status": "ok", "checks": {"redis": "ok", "workers": 1}}).encode()
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(ready), ready)
    with CannedHTTPServer(answer) as other:
        env = _fresh_env(home, FLOWPOOL_API_URL=other.url, FLOWPOOL_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
        listed = run_flowpool("runs", "anything", cwd=dev.cwd, env=env)
        doctored = run_flowpool("doctor", cwd=dev.cwd, env=env)
    assert listed.returncode == 1 and "no API key" in listed.stderr, listed.stderr
    checks = doctor_checks(doctored)
    assert checks["api"][0] == "ok", checks["api"]  # the API answered: doctor would have sent a key it had
    assert checks["api key"][0] == "BAD" and checks["api key"][1].startswith("not set"), checks["api key"]
    assert other.heads and all(dev.key not in head for head in other.heads), other.heads


def test_a_record_read_while_no_dev_held_the_directory_is_not_believed(tmp_path: Path) -> None:
    # The record is a FIFO, so a reader that reads it before probing the lock waits in the read while a dev
    # claims the directory; what it then reads is a record from before that dev.
    from flowpool import devstate

    data_dir = tmp_path / ".flowpool"
    data_dir.mkdir()
    os.mkfifo(data_dir / "dev.json")
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.append(devstate.running_dev(data_dir)), daemon=True)
    reader.start()
    reader.join(2)
    lock = None
    try:
        if reader.is_alive():  # it waits in the read
            lock = devstate.claim(data_dir)
            with open(data_dir / "dev.json", "w") as record:
                record.write(json.dumps({"api_url": "http://127.0.0.1:9", "redis_url": "redis://127.0.0.1:9/0",
                                         "pid": 1}))
            reader.join(10)
    finally:
        if lock is not None:
            os.close(lock)
    assert found == [None]


# flowpool doctor checks what it names: the API, the key, Redis, the workers.

@pytest.mark.slow
def test_doctor_run_where_dev_runs_finds_its_api_key_redis_and_workersok(dev: Dev, home: Path) -> None:
    result = run_flowpool("doctor", cwd=dev.cwd, env=_fresh_env(home))
    checks = doctor_checks(result)
    found = f"(from the flowpool dev running on {dev.data_dir})"
    assert checks["redis"] == ("ok", f"{dev.redis_url} {found}")
    assert checks["redis reachable"] == ("ok", "yes")
    assert checks["workers"][0] == "ok" and checks["workers"][1].startswith("flowpool@"), checks["workers"]
    assert checks["api"] == ("ok", f"{dev.api_url} {found}: ready, 1 worker")
    assert checks["api key"] == ("ok", f"accepted {found}")
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_doctor_fails_saying_the_fix_for_an_api_that_does_not_answer_and_for_a_key_it_refuses(
        dev: Dev, home: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    # FLOWPOOL_REDIS_URL too: with FLOWPOOL_API_URL set, dev's Redis is not used, and the default one is not ours.
    result = run_flowpool("doctor", cwd=dev.cwd, env=_fresh_env(home, FLOWPOOL_API_URL=closed,
                                                                 FLOWPOOL_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    checks = doctor_checks(result)
    status, said = checks["api"]
    assert status == "BAD" and said.startswith(f"{closed} (from FLOWPOOL_API_URL): no answer"), said
    assert "start it with `flowpool dev`, or set FLOWPOOL_API_URL" in said
    assert checks["api key"] == ("BAD", "not checked: the API did not answer")
    assert result.returncode == 1

    result = run_flowpool("doctor", cwd=dev.cwd, env=_fresh_env(home, FLOWPOOL_API_KEY="fp_bogus"))
    checks = doctor_checks(result)
    assert checks["api"][0] == "ok", checks["api"]
    status, said = checks["api key"]
    assert status == "BAD" and said.startswith("rejected: the API answers 401 to the key from FLOWPOOL_API_KEY"), said
    assert "`flowpool accounts create NAME`" in said
    assert "fp_bogus" not in result.stdout + result.stderr  # a key is never printed
    assert result.returncode == 1


# The banner's lines run as printed, in a fresh shell: no venv activated, nothing exported.

@pytest.mark.slow
def test_the_banner_lines_run_as_printed_in_a_fresh_shell_from_another_directory(
        dev: Dev, home: Path, tmp_path: Path) -> None:
    lines = dev.try_lines()
    export = lines[0].strip()
    assert export == (f"export FLOWPOOL_API_URL={dev.api_url} FLOWPOOL_API_KEY={dev.key} "
                      f"FLOWPOOL_REDIS_URL={dev.redis_url}")
    # dev runs outside a checkout here: the banner writes a workflow before it pushes it.
    assert lines[1].strip().startswith("printf ") and " > echo.py && " in lines[1]
    flowpool = re.search(r"&& (\S+) push ", lines[1]).group(1)  # type: ignore[union-attr]  # how it runs flowpool
    # Elsewhere than dev's directory: the export line alone tells the commands where dev is.
    script = "\n".join(lines) + f"\necho\n{flowpool} accounts create carol\n"
    ran = subprocess.run(["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}", "bash", "-ec", script],
                         cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    out = ok(ran).splitlines()
    assert re.fullmatch(r"echo@\d+\.\d+\.\d+ \((new version|unchanged, active)\)", out[0]), ran.stdout
    assert json.loads(out[1])["output"] == {"echo": "hello flowpool", "words": 2}
    assert f"Redis: {dev.redis_url} (from FLOWPOOL_REDIS_URL)" in ran.stderr
    assert dev.accepts(out[-1])


# flowpool dev on a port that is taken.

def test_dev_on_a_busy_port_says_so_in_one_line_and_leaves_nothing_running(home: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-I", "-m", "flowpool.cli", "dev", "--port", str(port)],
                                cwd=tmp_path, env=_fresh_env(home), capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""
    assert re.fullmatch(rf"flowpool dev: port {port} on 127\.0\.0\.1 is in use by another server; pass --port N "
                        r"\(e\.g\. --port \d+\)\n", result.stderr), result.stderr
    assert not (tmp_path / ".flowpool" / "redis").exists()  # no Redis was started
    assert not os.path.exists(tmp_path / ".flowpool" / "dev.json")


def test_the_banner_names_the_console_where_its_key_signs_in(dev: Dev) -> None:
    console = re.search(r"^\s+Console:\s+(\S+)\s+\(sign in with the API key\)$", dev.output, re.M)
    assert console is not None, dev.output
    assert console.group(1) == f"{dev.api_url}/console"
    session = requests.Session()
    signed_in = session.post(f"{dev.api_url}/console/sign-in", data={"api_key": dev.key}, timeout=30)
    assert signed_in.status_code == 200 and signed_in.url.startswith(f"{dev.api_url}/console/workflows"), signed_in.url
