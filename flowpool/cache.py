"""The result cache, keyed by a hash of everything that decides a run's output, with single flight.

Lookups and taking the single-flight lock happen in :meth:`RunStore.begin`,
in the same round trip that queues the run record. An operator may put the
cache in a Redis of its own (``FLOWPOOL_CACHE_REDIS_URL``), one that may
evict under memory pressure: lookups and the lock then take a round trip of
their own there (:meth:`ResultCache.lookup`) before the run is recorded.

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
import json
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


# Where the cache has a Redis of its own: a hit, or the leader of an identical
# run in flight, or the single-flight lock taken for this request.
_LOOKUP = """
local entry_key, lock_key = KEYS[1], KEYS[2]
local request_id, lock_ms = ARGV[1], ARGV[2]
local hit = redis.call('GET', entry_key)
if hit then return {'hit', hit} end
local leader = redis.call('GET', lock_key)
if leader then return {'join', leader} end
redis.call('SET', lock_key, request_id, 'PX', lock_ms)
return {'lead'}
"""


class ResultCache:
    """Look up, store and single-flight cached results.

    They live in ``store``, a Redis of their own, when given; else in the
    registry's Redis ``client``, where :meth:`RunStore.begin` reads them.
    """

    def __init__(self, client: redis.Redis, server_key: ServerKey, store: redis.Redis | None = None) -> None:
        self.redis = store or client
        self.separate = store is not None
        self.server_key = server_key
        self._release = self.redis.register_script(_RELEASE)
        self._lookup = self.redis.register_script(_LOOKUP)

    def pipeline(self, registry_pipe: Any) -> Any:
        """The pipeline cache writes go in: ``registry_pipe`` itself, unless the cache has a Redis of its own."""
        return self.redis.pipeline(transaction=False) if self.separate else registry_pipe

    def lookup(self, account_id: str, cache_key: str, request_id: str, lock_seconds: float) -> tuple[str, Any]:
        """In a cache of its own: ``("hit", entry)``, ``("join", leader request id)``, or ``("lead", None)`` with the
        single-flight lock taken for ``request_id``."""
        entry_key, lock_key, _ = self.redis_keys(account_id, cache_key)
        reply = self._lookup(keys=[entry_key, lock_key], args=[request_id, int(lock_seconds * 1000)])
        state = reply[0].decode()
        if state == "hit":
            return state, json.loads(reply[1])
        return state, reply[1].decode() if state == "join" else None

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
        """Queue the write of a result for ``ttl`` seconds, with what a hit's run record copies (which only a cache
        in the registry's Redis keeps: elsewhere the hit's record is made from the entry)."""
        entry_key, _, record_key = self.redis_keys(account_id, cache_key)
        pipe.set(entry_key, canonical_json(entry), ex=ttl)
        if record_fields and not self.separate:
            pipe.delete(record_key)
            pipe.hset(record_key, mapping=record_fields)
            pipe.expire(record_key, ttl)

    def release(self, account_id: str, cache_key: str, request_id: str, pipe: Any = None) -> None:
        """Stop leading ``cache_key`` (only if ``request_id`` still leads it)."""
        self._release(keys=[keys.inflight(account_id, cache_key)], args=[request_id], client=pipe)
