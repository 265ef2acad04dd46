"""Named JSON documents of an account, validated by a pydantic model (applications, agents)."""
from __future__ import annotations

import json
from typing import Any, Callable, Generic, TypeVar

import redis
from pydantic import BaseModel

from flowpool.errors import NotFound

__all__ = ["AccountDocuments"]

M = TypeVar("M", bound=BaseModel)


class AccountDocuments(Generic[M]):
    """Put, get and list documents kept in one Redis hash per account."""

    model: type[M]
    noun: str
    key: Callable[[str], str]
    # The validation context stored documents are read with (what a model allows of what it once took).
    context: dict[str, Any] | None = None

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def put(self, account_id: str, name: str, document: M) -> bool:
        """Create or replace ``name``; True when it is new."""
        return bool(self.redis.hset(type(self).key(account_id), name, document.model_dump_json(exclude_none=True)))

    def get(self, account_id: str, name: str) -> M:
        raw = self.redis.hget(type(self).key(account_id), name)
        if raw is None:
            raise NotFound(f"no {self.noun} named {name!r}")
        return self.model.model_validate_json(raw, context=self.context)

    def list(self, account_id: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """A page of the account's documents by name, and the total."""
        key = type(self).key(account_id)
        names = sorted(n.decode() for n in self.redis.hkeys(key))
        page = names[offset:offset + limit]
        raws = self.redis.hmget(key, page) if page else []
        return [{"name": n, **json.loads(r)} for n, r in zip(page, raws) if r is not None], len(names)
