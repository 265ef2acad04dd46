"""The API process as `flowpool api` starts it: what it leaves on the host."""
from __future__ import annotations

import time
from pathlib import Path

import requests

from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer


def test_the_api_leaves_no_control_socket_in_the_users_home(redis_server: RedisServer, tmp_path: Path) -> None:
    # gunicorn 27 opens ~/.gunicorn/gunicorn.ctl by default: one path per user, taken over by each API started
    # on the host and left behind after it stops.
    stack = Stack(env={"HOME": str(tmp_path)}, redis_url=redis_server.url)
    try:
        url = stack.start_api(quiet=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the API did not answer /healthz"
            time.sleep(0.1)
    finally:
        stack.stop()
    assert not (tmp_path / ".gunicorn").exists()
