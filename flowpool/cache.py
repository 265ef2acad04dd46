"""The result cache, keyed by a hash of everything that decides a run's output, with single flight.

Lookups and taking the single-flight lock happen in :meth:`RunStore.begin`,
in the same round trip that queues the run record.

The key is the SHA-256 of the canonical JSON of the account, the script
version's content hash, the workflow's env, ``input``, ``messages``, the
inference params, ``metadata`` and an HMAC of the request secrets: two
requests differing only in a secret never share a result, and the secrets
themselves are never written. Only successful runs are stored. An output
that carries a request secret is stored redacted, with its clear form sealed
for the requests holding those secrets (:class:`~flowpool.sealing.SecretBox`):
only they find the entry, and only they can open it.
"""
from __future__ import annotations

import hashlib
from typing import Any

import redis

from . import keys
from .jsonsafe import canonical_json
from .sealing import ServerKey

__all__ = ["ResultCache"]

# Drop the single-flight lock, only if this run still holds it (it may have expired and passed on).
_RELEASE = """
local lock_key, request_id = KEYS[1], ARGV[1]
if redis.call('GET', lock_key) == request_id then return redis.call('DEL', lock_key) end
return 0
"""


class ResultCache:
    """Look up, store and single-flight cached results of one Redis."""

    def __init__(self, client: redis.Redis, server_key: ServerKey) -> None:
        self.redis = client
        self.server_key = server_key
        self._release = client.register_script(_RELEASE)

    def key(self, account_id: str, content_hash: str, config_hash: str, request: dict[str, Any],
            secrets: dict[str, str] | None) -> str:
        """The cache key of a request to one workflow version."""
        secrets_mac = self.server_key.mac(secrets) if secrets else ""
        material = {
            "account": account_id, "version": content_hash, "config": config_hash,
            "input": request.get("input"), "messages": request.get("messages"),
            "params": {k: request.get(k) for k in ("max_tokens", "temperature")},
            "metadata": request.get("metadata"), "secrets": secrets_mac,
        }
        return hashlib.sha256(canonical_json(material)).hexdigest()

    @staticmethod
    def redis_keys(account_id: str, cache_key: str) -> tuple[str, str, str]:
        """The Redis keys of a cache entry, of its in-flight lock and of the run-record fields a hit copies."""
        return (keys.cache(account_id, cache_key), keys.inflight(account_id, cache_key),
                keys.cache_record(account_id, cache_key))

    def put(self, pipe: Any, account_id: str, cache_key: str, entry: dict[str, Any], ttl: int,
            record_fields: dict[str, str] | None = None) -> None:
        """Queue the write of a result for ``ttl`` seconds, with what a hit's run record copies."""
        entry_key, _, record_key = self.redis_keys(account_id, cache_key)
        pipe.set(entry_key, canonical_json(entry), ex=ttl)
        if record_fields:
            pipe.delete(record_key)
            pipe.hset(record_key, mapping=record_fields)
            pipe.expire(record_key, ttl)

    def release(self, account_id: str, cache_key: str, request_id: str, pipe: Any = None) -> None:
        """Stop leading ``cache_key`` (only if ``request_id`` still leads it)."""
        self._release(keys=[keys.inflight(account_id, cache_key)], args=[request_id], client=pipe)
