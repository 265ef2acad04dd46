"""Console sessions in a real Redis: the sliding refresh never brings back a session signed out meanwhile."""
from __future__ import annotations

from typing import Any

import redis

from flowpool import keys
from flowpool.redis_server import RedisServer
from flowpool.registry.accounts import Account, hash_key
from flowpool.registry.console_sessions import ConsoleSessions

API_KEY = "fp-test-key-0123456789"


class _SignedOutAfterRead(redis.Redis):
    """A client after whose read of a session another request signs it out (the race, made to happen)."""

    def hgetall(self, name: Any) -> Any:
        fields = super().hgetall(name)
        self.delete(name)
        return fields


def _started(redis_db: redis.Redis) -> tuple[str, str]:
    """A session due for its refresh: its token and its Redis key."""
    account = Account("acct-1", "one")
    redis_db.set(keys.api_key(hash_key(API_KEY)), account.id)
    token = ConsoleSessions(redis_db, 3600).start(account, API_KEY)
    key = keys.console_session(hash_key(token))
    redis_db.hset(key, "refreshed_at", 0)  # last pushed back long ago
    return token, key


def test_a_session_signed_out_between_its_read_and_its_refresh_stays_gone(redis_server: RedisServer,
                                                                          redis_db: redis.Redis) -> None:
    token, key = _started(redis_db)
    racing = _SignedOutAfterRead(host="127.0.0.1", port=redis_server.port, db=15)
    try:
        racing_sessions = ConsoleSessions(racing, 3600)
        racing_sessions.find(token)
    finally:
        racing.close()

    assert not redis_db.exists(key)
    assert ConsoleSessions(redis_db, 3600).find(token) is None


def test_a_live_session_due_for_its_refresh_is_pushed_back(redis_db: redis.Redis) -> None:
    token, key = _started(redis_db)
    redis_db.expire(key, 100)

    found = ConsoleSessions(redis_db, 3600).find(token)

    assert found is not None and found.account.id == "acct-1"
    assert redis_db.ttl(key) > 100
    assert float(redis_db.hget(key, "refreshed_at") or 0) > 0
