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
from pathlib import Path
from typing import Iterator

import pytest
import requests

from flowpool.devstack import Stack
from flowpool.procs import free_port
from tests.conftest import SESSION_PIDS
from tests.helpers import DevProcess

REPO = Path(__file__).resolve().parents[2]
ECHO_EXAMPLE = REPO / "examples" / "echo.py"


def _fresh_env(home: Path, **settings: str) -> dict[str, str]:
    """What a new login shell has: a PATH without the venv, a HOME, no FLOWPOOL_* variable; plus ``settings``."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", **settings}


def _flowpool(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``flowpool ARGS`` in ``cwd`` with exactly ``env``."""
    return subprocess.run([sys.executable, "-I", "-m", "flowpool.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def _doctor_lines(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """``{check: (ok|BAD, value)}`` of doctor's output."""
    checks = {}
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"(ok |BAD) (.{16}) ?(.*)", line)
        assert match, f"unexpected doctor line {line!r} in:\n{result.stdout}"
        checks[match.group(2).strip()] = (match.group(1).strip(), match.group(3))
    return checks


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
    made = _flowpool("accounts", "create", "alice", cwd=dev.cwd, env=_fresh_env(home))
    key = _ok(made).strip()
    assert f"Redis: {dev.redis_url} (from the flowpool dev running on {dev.data_dir})" in made.stderr, made.stderr
    assert "warning" not in made.stderr
    assert dev.accepts(key)  # written to dev's Redis: dev's API knows the key
    # From anywhere, with dev's FLOWPOOL_DATA_DIR.
    elsewhere = _flowpool("accounts", "create", "bob", cwd=tmp_path,
                          env=_fresh_env(home, FLOWPOOL_DATA_DIR=str(dev.data_dir)))
    assert dev.accepts(_ok(elsewhere).strip())
    record = dev.data_dir / "dev.json"
    assert json.loads(record.read_text()) == {"api_url": dev.api_url, "redis_url": dev.redis_url,
                                              "pid": dev.process.pid}
    assert stat.S_IMODE(record.stat().st_mode) == 0o600


@pytest.mark.slow
def test_push_invoke_and_runs_run_where_dev_runs_use_its_api_and_key(dev: Dev, home: Path) -> None:
    env = _fresh_env(home)
    shutil.copy(ECHO_EXAMPLE, dev.cwd / "found.py")
    assert re.fullmatch(r"found@\d+\.\d+\.\d+ \(new version\)\n", _ok(_flowpool("push", "found.py", "--name", "found",
                                                                                  cwd=dev.cwd, env=env)))
    invoked = _ok(_flowpool("invoke", "found", "--input", '{"text": "no exports"}', cwd=dev.cwd, env=env))
    assert json.loads(invoked) == {"echo": "no exports", "words": 2}
    assert _ok(_flowpool("runs", "found", cwd=dev.cwd, env=env)).strip()


def test_a_record_left_by_a_dev_that_is_gone_is_not_believed(stack: Stack, home: Path, tmp_path: Path) -> None:
    # What a dev killed outright leaves: its record and key, and no process holding the directory's lock.
    data_dir = tmp_path / ".flowpool"
    data_dir.mkdir()
    (data_dir / "dev.json").write_text(json.dumps({"api_url": stack.api_url, "redis_url": stack.redis_url,
                                                   "pid": 1}))
    (data_dir / "dev-key").write_text(stack.create_account("gone") + "\n")
    result = _flowpool("runs", "anything", cwd=tmp_path, env=_fresh_env(home))
    assert result.returncode == 1
    assert "no API key: run this where `flowpool dev` runs" in result.stderr, result.stderr


# flowpool doctor checks what it names: the API, the key, Redis, the workers.

@pytest.mark.slow
def test_doctor_run_where_dev_runs_finds_its_api_key_redis_and_workers_ok(dev: Dev, home: Path) -> None:
    result = _flowpool("doctor", cwd=dev.cwd, env=_fresh_env(home))
    checks = _doctor_lines(result)
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
    result = _flowpool("doctor", cwd=dev.cwd, env=_fresh_env(home, FLOWPOOL_API_URL=closed))
    checks = _doctor_lines(result)
    status, said = checks["api"]
    assert status == "BAD" and said.startswith(f"{closed} (from FLOWPOOL_API_URL): no answer"), said
    assert "start it with `flowpool dev`, or set FLOWPOOL_API_URL" in said
    assert checks["api key"] == ("BAD", "not checked: the API did not answer")
    assert result.returncode == 1

    result = _flowpool("doctor", cwd=dev.cwd, env=_fresh_env(home, FLOWPOOL_API_KEY="fp_bogus"))
    checks = _doctor_lines(result)
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
    out = _ok(ran).splitlines()
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
