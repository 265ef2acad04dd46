"""What flowpool dev shows of the URLs it prints."""
from __future__ import annotations

import pytest

from flowpool.devstate import shown_url


@pytest.mark.parametrize("url, shown", [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:hunter2@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("rediss://app:hunter2@cache.internal:6380/1", "rediss://app:***@cache.internal:6380/1"),
    ("amqp://guest:hunter2@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
    ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***"),
    ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?password=***"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("rediss://h:6380/0?ssl_cert_reqs=none", "rediss://h:6380/0?ssl_cert_reqs=none"),
])
def test_a_printed_url_never_shows_a_password_wherever_the_url_holds_it(url: str, shown: str) -> None:
    assert shown_url(url) == shown
    assert "hunter2" not in shown_url(url)
