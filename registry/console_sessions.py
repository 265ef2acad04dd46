"""Web console sessions: a random token in the browser's cookie, and in Redis what it stands for.

A session is the hash keys.console_session(sha256(token)) {account, account_name, key_hash, csrf, created_at,
refreshed_at} with a TTL of FLOWPOOL_CONSOLE_SESSION_SECONDS, pushed back (at most once a minute) by each
request that uses it. Redis holds only the token's SHA-256 and the API key's, so reading Redis gives no way
in. Each use checks that the API key signed in with still belongs to the account: deleting a key ends the
sessions made with it at once.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import redis

from flowpool import keys

from .accounts import Account, hash_key

__all__ = ["ConsoleSession", "ConsoleSessions"]

# A token longer than this was not made here: it is not looked up.
_MAX_TOKEN_LENGTH = 256

# Push a session's end back only while it is there: a sign-out between a request's read and this refresh leaves
# no hash behind (an HSET and an EXPIRE on their own would make one, with a TTL, out of nothing).
_REFRESH = """
local key = KEYS[1]
local now = ARGV[1]
local ttl = ARGV[2]
if redis.call('EXISTS', key) == 0 then
  return 0
end
redis.call('HSET', key, 'refreshed_at', now)
redis.call('EXPIRE', key, ttl)
return 1
"""


@dataclass(frozen=True)
class ConsoleSession:
    """A live console session: whose it is, and the CSRF token its writes must carry."""

    account: Account
    csrf: str


class ConsoleSessions:
    """Start, find and end console sessions."""

    # A sliding session is pushed back at most this often: one write a minute, not one per request.
    REFRESH_SECONDS = 60.0

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.redis = client
        self.ttl_seconds = ttl_seconds
        self._refresh = client.register_script(_REFRESH)

    def start(self, account: Account, api_key: str) -> str:
        """A new session of ``account``, signed in with ``api_key`` (already checked): its token, for the cookie."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        key = keys.console_session(hash_key(token))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"account": account.id, "account_name": account.name, "key_hash": hash_key(api_key),
                                "csrf": secrets.token_urlsafe(32), "created_at": now, "refreshed_at": now})
        pipe.expire(key, self.ttl_seconds)
        pipe.execute()
        return token

    def find(self, token: str | None) -> ConsoleSession | None:
        """The live session of ``token``, its lifetime pushed back; None when it has ended or its key is gone."""
        if not token or len(token) > _MAX_TOKEN_LENGTH:
            return None
        key = keys.console_session(hash_key(token))
        fields = {k.decode(): v.decode() for k, v in self.redis.hgetall(key).items()}
        if not fields.get("account") or not fields.get("key_hash"):
            return None
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.api_key(fields["key_hash"]))
        if now - float(fields.get("refreshed_at") or 0) >= self.REFRESH_SECONDS:
            self._refresh(keys=[key], args=[now, self.ttl_seconds], client=pipe)
        owner = pipe.execute()[0]
        if owner is None or owner.decode() != fields["account"]:
            self.redis.delete(key)
            return None
        return ConsoleSession(Account(fields["account"], fields.get("account_name", "")), fields.get("csrf", ""))

    def end(self, token: str | None) -> None:
        """End the session of ``token`` (the cookie, if kept, opens nothing any more)."""
        if token and len(token) <= _MAX_TOKEN_LENGTH:
            self.redis.delete(keys.console_session(hash_key(token)))
