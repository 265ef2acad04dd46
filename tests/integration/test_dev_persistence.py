"""What lasts: ``flowpool dev`` keeps its data and its key across restarts, and doctor warns of a Redis that won't.

Each test starts ``flowpool dev`` as a user does, in a working directory of its
own (where it keeps ``.flowpool/``), stops it with SIGTERM and starts it again.
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import redis

from flowpool.procs import free_port
from flowpool.redis_server import RedisServer
from tests.helpers import Client, DevProcess, doctor_checks, run_flowpool

ECHO = "def execute(ctx):\n    return {'echo': ctx.input['text']}\n"


def _env(**settings: str) -> dict[str, str]:
    """The test process's environment without any FLOWPOOL_* variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    env.update(FLOWPOOL_LOG_LEVEL="WARNING", **settings)
    return env


class Dev(DevProcess):
    """One ``flowpool dev`` in its own session and working directory, its output read as it comes."""

    def __init__(self, cwd: Path, *args: str, **settings: str) -> None:
        super().__init__(free_port(), cwd=cwd, env=_env(**settings), args=args, python_flags=("-I",))


@pytest.fixture
def devs() -> Iterator[list[Dev]]:
    """Every dev a test starts, killed at the end whatever happened."""
    started: list[Dev] = []
    try:
        yield started
    finally:
        for dev in started:
            dev.kill()


def _start(devs: list[Dev], cwd: Path, *args: str, **settings: str) -> tuple[Dev, Client]:
    dev = Dev(cwd, *args, **settings)
    devs.append(dev)
    return dev, dev.wait_for_banner()


def _refs(client: Client) -> list[str]:
    response = client.get("/api/v1/workflows")
    assert response.status_code == 200, response.text
    return [workflow["workflow_ref_name"] for workflow in response.json()["data"]]


def _echo(client: Client, text: str) -> object:
    response = client.invoke("keep", input={"text": text})
    assert response.status_code == 200, response.text
    return response.json()["output"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dev_restart_keeps_the_pushed_workflow_and_the_key_and_reset_wipes_both(
        tmp_path: Path, devs: list[Dev]) -> None:
    first, client = _start(devs, tmp_path)
    client.upload("keep", ECHO)
    assert _echo(client, "before") == {"echo": "before"}
    # Two servers appending to one AOF would corrupt it: a second dev on the directory refuses to start.
    second_at_once = subprocess.run([sys.executable, "-I", "-m", "flowpool.cli", "dev", "--port", str(free_port())],
                                    env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert second_at_once.returncode == 2
    assert f"{tmp_path / '.flowpool'} is in use by another flowpool dev" in second_at_once.stderr
    first.stop()

    key_file = tmp_path / ".flowpool" / "dev-key"
    assert key_file.read_text().strip() == first.key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    second, client = _start(devs, tmp_path)
    assert second.key == first.key  # printed again, the same
    assert _refs(client) == ["keep"]
    assert _echo(client, "after a restart") == {"echo": "after a restart"}
    second.stop()

    third, client = _start(devs, tmp_path, "--reset")
    assert f"removed {tmp_path / '.flowpool'}" in third.output
    assert third.key != first.key
    assert _refs(client) == []
    assert Client(third.api_url, first.key).get("/api/v1/workflows").status_code == 401
    third.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_with_a_redis_url_dev_keeps_only_its_key_in_the_data_dir(tmp_path: Path, devs: list[Dev]) -> None:
    with RedisServer() as server:
        first, _ = _start(devs, tmp_path, FLOWPOOL_REDIS_URL=server.url, FLOWPOOL_DATA_DIR="state")
        first.stop()
        second, client = _start(devs, tmp_path, FLOWPOOL_REDIS_URL=server.url, FLOWPOOL_DATA_DIR="state")
        assert second.key == first.key
        assert client.get("/api/v1/workflows").status_code == 200
        second.stop()
        assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["dev-key"]
        # The key is that Redis's: gone with its data, it is replaced by a new one that works.
        redis.Redis.from_url(server.url).flushall()
        third, client = _start(devs, tmp_path, FLOWPOOL_REDIS_URL=server.url, FLOWPOOL_DATA_DIR="state")
        assert third.key != first.key
        assert client.get("/api/v1/workflows").status_code == 200
        third.stop()


# flowpool doctor on Redis servers that keep their data, or don't.

def _doctor(redis_url: str) -> subprocess.CompletedProcess[str]:
    # An API address that answers nothing: doctor must not reach whatever listens on the default one.
    return run_flowpool("doctor", env=_env(FLOWPOOL_REDIS_URL=redis_url,
                                           FLOWPOOL_API_URL=f"http://127.0.0.1:{free_port()}"))


def _warnings(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("WRN redis data")]


def test_doctor_warns_of_a_redis_that_keeps_nothing_and_says_so_in_an_ok_redis_data_line() -> None:
    with RedisServer(options=["--appendonly", "no", "--save", ""]) as server:
        result = _doctor(server.url)
    [warning] = _warnings(result)
    assert "no persistence" in warning and "docs/operations.md" in warning
    assert doctor_checks(result)["redis data"] == ("ok", "nothing; maxmemory-policy noeviction")


def test_doctor_fails_a_redis_that_evicts_with_a_bad_redis_data_line_saying_the_fix(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path / "redis") as server:
        redis.Redis.from_url(server.url).config_set("maxmemory-policy", "allkeys-lru")
        result = _doctor(server.url)
    assert _warnings(result) == [], result.stderr
    status, said = doctor_checks(result)["redis data"]
    assert status == "BAD" and said.startswith("AOF (appendfsync everysec); maxmemory-policy allkeys-lru: "), said
    assert "set maxmemory-policy noeviction" in said
    assert result.returncode == 1


def test_doctor_fails_a_redis_that_evicts_and_keeps_nothing_and_warns_of_both() -> None:
    with RedisServer(options=["--appendonly", "no", "--save", "", "--maxmemory-policy", "allkeys-lru"]) as server:
        result = _doctor(server.url)
    status, said = doctor_checks(result)["redis data"]
    assert status == "BAD" and said.startswith("nothing; maxmemory-policy allkeys-lru: a full Redis evicts"), said
    [warning] = _warnings(result)
    assert "no persistence" in warning
    assert result.returncode == 1


def test_doctor_is_content_with_a_persistent_noeviction_redis(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path / "redis") as server:
        result = _doctor(server.url)
    assert _warnings(result) == [], result.stderr
    assert re.search(r"^ok  redis data\s+AOF \(appendfsync everysec\); maxmemory-policy noeviction$",
                     result.stdout, re.M), result.stdout


def test_doctor_says_it_could_not_check_a_redis_without_config() -> None:
    with RedisServer(options=["--appendonly", "no", "--save", "", "--rename-command", "CONFIG", ""]) as server:
        result = _doctor(server.url)
    [warning] = _warnings(result)
    assert "could not check" in warning
    assert doctor_checks(result)["redis data"][0] == "ok", result.stdout  # INFO still says the policy
