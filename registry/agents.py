"""Agents: per account, an OpenAI-compatible agent endpoint or a workflow that answers like one."""
from __future__ import annotations

import json
from typing import Any, Optional

import redis
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from flowpool import keys
from flowpool.errors import NotFound

__all__ = ["Agent", "Agents"]


class Agent(BaseModel):
    """``{"base_url", "model"?, "api_key_env"?, "api_key_secret"?}`` or ``{"workflow": "<ref_name>"}``."""

    model_config = ConfigDict(extra="forbid")

    base_url: Optional[StrictStr] = Field(None, pattern=r"^https?://[^\s/]+")
    model: Optional[StrictStr] = None
    api_key_env: Optional[StrictStr] = None
    api_key_secret: Optional[StrictStr] = None
    params: dict[str, Any] = Field(default_factory=dict)
    workflow: Optional[StrictStr] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")

    @model_validator(mode="after")
    def _one_kind(self) -> Agent:
        if (self.base_url is None) == (self.workflow is None):
            raise ValueError("an agent has either a base_url (an endpoint) or a workflow, not both or neither")
        return self


class Agents:
    """Store and read the agents of an account."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def put(self, account_id: str, name: str, agent: Agent) -> bool:
        return bool(self.redis.hset(keys.agents(account_id), name, agent.model_dump_json(exclude_none=True)))

    def get(self, account_id: str, name: str) -> Agent:
        raw = self.redis.hget(keys.agents(account_id), name)
        if raw is None:
            raise NotFound(f"no agent named {name!r}")
        return Agent.model_validate_json(raw)

    def list(self, account_id: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        names = sorted(n.decode() for n in self.redis.hkeys(keys.agents(account_id)))
        page = names[offset:offset + limit]
        raws = self.redis.hmget(keys.agents(account_id), page) if page else []
        return [{"name": n, **json.loads(r)} for n, r in zip(page, raws) if r is not None], len(names)
