"""Accounts and their API keys. Keys are random tokens, stored only as their SHA-256."""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from flowpool import keys
from flowpool.errors import AuthenticationError

__all__ = ["Account", "Accounts", "hash_key"]

KEY_PREFIX = "fp_"
WEBHOOK_SECRET_PREFIX = "whsec_"


def hash_key(api_key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class Account:
    id: str
    name: str


class Accounts:
    """Create accounts, issue keys, and find the account of a key."""

    # Keys are never edited in place, so a short in-process memory of key ->
    # account saves a Redis round trip on every request.
    _MEMORY_SECONDS = 10.0

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._memory: dict[str, tuple[float, Account]] = {}
        self._lock = threading.Lock()

    def create(self, name: str) -> tuple[Account, str, bool]:
        """A new key for the account called ``name``, creating the account if needed.

        Returns the account, the key in clear (shown once, never stored) and
        whether the account is new.
        """
        name = name.strip()
        if not name:
            raise ValueError("an account needs a name")
        new_id = uuid.uuid4().hex
        created = bool(self.redis.hsetnx(keys.ACCOUNTS, name, new_id))
        account_id = new_id if created else self.redis.hget(keys.ACCOUNTS, name).decode()
        if created:
            self.redis.hset(keys.account(account_id), mapping={"name": name, "created_at": time.time()})
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        self.redis.set(keys.api_key(hash_key(api_key)), account_id)
        return Account(account_id, name), api_key, created

    def find(self, name: str) -> Account | None:
        """The account called ``name``; None if there is none."""
        account_id = self.redis.hget(keys.ACCOUNTS, name)
        return None if account_id is None else Account(account_id.decode(), name)

    def webhook_secret(self, account_id: str, rotate: bool = False) -> str:
        """The secret that signs the account's webhooks, made on first use; ``rotate`` replaces it with a new one.

        After a rotation, deliveries already under way may still carry the old
        signature: a receiver should accept both secrets for a few minutes.
        """
        key = keys.account(account_id)
        if not rotate:  # one read on every delivery but the account's first
            held = self.redis.hget(key, "webhook_secret")
            if held is not None:
                return held.decode()
        fresh = WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)
        if rotate:
            self.redis.hset(key, "webhook_secret", fresh)
            return fresh
        # HSETNX: two processes making the first secret at once agree on one of them.
        if self.redis.hsetnx(key, "webhook_secret", fresh):
            return fresh
        return self.redis.hget(key, "webhook_secret").decode()

    def authenticate(self, api_key: str | None) -> Account:
        """The account owning ``api_key``; AuthenticationError if there is none."""
        if not api_key:
            raise AuthenticationError("missing API key: send it as 'x-api-key', 'X-Maitai-Api-Key' or "
                                      "'Authorization: Bearer <key>'")
        digest = hash_key(api_key)
        now = time.monotonic()
        remembered = self._memory.get(digest)
        if remembered is not None and remembered[0] > now:
            return remembered[1]
        account_id = self.redis.get(keys.api_key(digest))
        if account_id is None:
            raise AuthenticationError("unknown API key")
        account_id = account_id.decode()
        name = self.redis.hget(keys.account(account_id), "name")
        account = Account(account_id, name.decode() if name else "")
        with self._lock:
            if len(self._memory) > 10_000:
                self._memory.clear()
            self._memory[digest] = (now + self._MEMORY_SECONDS, account)
        return account
