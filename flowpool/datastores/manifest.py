"""A datastore's manifest in Redis: its spec, its incarnation and the head of its batch log.

The truth of a store is its log of immutable batch blobs; Redis holds only
the small part every reader checks before a read (one HMGET):

- ``keys.datastore(account, name)``, a hash: ``spec`` (JSON), ``generation``
  (a random id per incarnation: a store deleted and created again gets a new
  one, so no replica of the old store is ever read as the new one), ``head``
  (the seq of the last batch; 0 when empty), ``tail`` (the blob name of batch
  ``head``: a replica at ``head`` that applied another batch of that seq, one
  Redis lost in a restart, sees it differs), ``records`` (how many records it
  holds), ``snapshot`` (the seq of the latest snapshot, 0 for none),
  ``created_at``, ``updated_at``;
- ``keys.datastore_log(account, name, generation)``, a list: the blob name of
  batch ``seq`` at index ``seq - 1``;
- ``keys.datastores(account)``, a zset: the account's store names.

A batch joins the log with a compare-and-set on the head (Lua), so two
writers never both become batch ``seq``: the one that loses rereads and tries
again.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowpool import keys
from flowpool.errors import Conflict, DatastoreNotFound
from flowpool.registry.names import is_name

from .spec import Spec

if TYPE_CHECKING:
    import redis

__all__ = ["Manifest", "Manifests", "StaleHead"]

_CREATE = """
local manifest_key = KEYS[1]
local index_key = KEYS[2]
local name = ARGV[1]
local spec = ARGV[2]
local generation = ARGV[3]
local now = ARGV[4]
if redis.call('EXISTS', manifest_key) == 1 then return 0 end
redis.call('HSET', manifest_key, 'spec', spec, 'generation', generation, 'head', 0, 'records', 0, 'snapshot', 0,
           'created_at', now, 'updated_at', now)
redis.call('ZADD', index_key, now, name)
return 1
"""

# Returns the new seq; -1: the store is gone (or another incarnation); -2: the head moved.
_APPEND = """
local manifest_key = KEYS[1]
local log_key = KEYS[2]
local generation = ARGV[1]
local expected_head = tonumber(ARGV[2])
local blob = ARGV[3]
local records_delta = tonumber(ARGV[4])
local now = ARGV[5]
if redis.call('HGET', manifest_key, 'generation') ~= generation then return -1 end
local head = tonumber(redis.call('HGET', manifest_key, 'head'))
if head ~= expected_head then return -2 end
redis.call('RPUSH', log_key, blob)
redis.call('HSET', manifest_key, 'head', head + 1, 'tail', blob, 'updated_at', now)
redis.call('HINCRBY', manifest_key, 'records', records_delta)
return head + 1
"""

_DROP = """
local manifest_key = KEYS[1]
local log_key = KEYS[2]
local index_key = KEYS[3]
local name = ARGV[1]
local generation = ARGV[2]
if redis.call('HGET', manifest_key, 'generation') ~= generation then return 0 end
redis.call('DEL', manifest_key, log_key)
redis.call('ZREM', index_key, name)
return 1
"""

_SNAPSHOT = """
local manifest_key = KEYS[1]
local generation = ARGV[1]
local seq = tonumber(ARGV[2])
if redis.call('HGET', manifest_key, 'generation') ~= generation then return 0 end
if tonumber(redis.call('HGET', manifest_key, 'snapshot')) >= seq then return 0 end
redis.call('HSET', manifest_key, 'snapshot', seq)
return 1
"""


class StaleHead(Exception):
    """Another batch joined the log first: reread the head and try again."""


@dataclass(frozen=True)
class Manifest:
    """One store incarnation as Redis has it now."""

    account_id: str
    spec: Spec
    generation: str
    head: int
    records: int
    snapshot: int
    created_at: float
    updated_at: float

    @property
    def prefix(self) -> str:
        """Where this incarnation's blobs live (batches/, snapshots/)."""
        return f"datastores/{self.account_id}/{self.spec.name}/{self.generation}/"

    def view(self) -> dict:
        """The store as the API shows it."""
        return {**self.spec.to_dict(), "version": self.head, "records": self.records,
                "created_at": self.created_at, "updated_at": self.updated_at}


class Manifests:
    """Reads and writes the manifests of every account's stores."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._create = client.register_script(_CREATE)
        self._append = client.register_script(_APPEND)
        self._drop = client.register_script(_DROP)
        self._snapshot = client.register_script(_SNAPSHOT)

    def create(self, account_id: str, spec: Spec, generation: str) -> Manifest:
        """Record a new store; 409 if the account has one of that name."""
        now = time.time()
        created = self._create(keys=[keys.datastore(account_id, spec.name), keys.datastores(account_id)],
                               args=[spec.name, json.dumps(spec.to_dict()), generation, now])
        if not created:
            raise Conflict(f"datastore {spec.name!r} already exists", param="name")
        return Manifest(account_id, spec, generation, 0, 0, 0, now, now)

    def read(self, account_id: str, name: str) -> Manifest:
        """The store's manifest; 404 if the account has none of that name."""
        data = self.redis.hgetall(keys.datastore(account_id, _checked(name)))
        if not data or b"generation" not in data:
            raise DatastoreNotFound(name)
        return _manifest(account_id, {k.decode(): v.decode() for k, v in data.items()})

    def head(self, account_id: str, name: str) -> tuple[str, int, str | None] | None:
        """(generation, head, tail) of the store now, in one round trip; None if it is gone."""
        generation, head, tail = self.redis.hmget(keys.datastore(account_id, _checked(name)), "generation", "head",
                                                  "tail")
        if generation is None or head is None:
            return None
        return generation.decode(), int(head), tail.decode() if tail else None

    def names(self, account_id: str) -> list[str]:
        return [name.decode() for name in self.redis.zrange(keys.datastores(account_id), 0, -1)]

    def append(self, manifest: Manifest, expected_head: int, blob: str, records_delta: int) -> int:
        """Make ``blob`` batch ``expected_head + 1``; StaleHead if another came first, 404 if the store is gone."""
        seq = int(self._append(
            keys=[keys.datastore(manifest.account_id, manifest.spec.name),
                  keys.datastore_log(manifest.account_id, manifest.spec.name, manifest.generation)],
            args=[manifest.generation, expected_head, blob, records_delta, time.time()]))
        if seq == -1:
            raise DatastoreNotFound(manifest.spec.name)
        if seq == -2:
            raise StaleHead()
        return seq

    def batches(self, account_id: str, name: str, generation: str, after: int, upto: int | None = None) -> list[str]:
        """The blob names of batches ``after + 1`` .. ``upto`` (None: to the end of the log)."""
        if upto is not None and upto <= after:
            return []
        names = self.redis.lrange(keys.datastore_log(account_id, name, generation), after,
                                  -1 if upto is None else upto - 1)
        return [item.decode() for item in names]

    def drop(self, manifest: Manifest) -> bool:
        """Remove this incarnation's manifest and log; False if it was already gone."""
        account_id, name = manifest.account_id, manifest.spec.name
        return bool(self._drop(keys=[keys.datastore(account_id, name),
                                     keys.datastore_log(account_id, name, manifest.generation),
                                     keys.datastores(account_id)], args=[name, manifest.generation]))

    def record_snapshot(self, manifest: Manifest, seq: int) -> bool:
        """Say a snapshot at ``seq`` is stored (only ever forward)."""
        return bool(self._snapshot(keys=[keys.datastore(manifest.account_id, manifest.spec.name)],
                                   args=[manifest.generation, seq]))

    def snapshot_seq(self, account_id: str, name: str) -> int:
        value = self.redis.hget(keys.datastore(account_id, name), "snapshot")
        return int(value) if value else 0


def _checked(name: str) -> str:
    """``name`` when it can be a store's name; else a 404 before it reaches a Redis key (``docs:<gen>:log`` is the
    key of a list, and would read as a WRONGTYPE error, a 500)."""
    if not is_name(name):
        raise DatastoreNotFound(name if isinstance(name, str) else repr(name))
    return name


def _manifest(account_id: str, data: dict[str, str]) -> Manifest:
    return Manifest(account_id=account_id, spec=Spec.from_dict(json.loads(data["spec"])),
                    generation=data["generation"], head=int(data["head"]), records=int(data.get("records", 0)),
                    snapshot=int(data.get("snapshot", 0)), created_at=float(data["created_at"]),
                    updated_at=float(data["updated_at"]))
