"""Applications: per account, which model, provider and fallbacks serve each intent of a workflow."""
from __future__ import annotations

import json
from typing import Any, Optional

import redis
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from flowpool import keys
from flowpool.errors import NotFound

__all__ = ["Application", "Applications", "Route", "IntentRoute"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class Route(BaseModel):
    """One OpenAI-compatible endpoint serving a model."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1)
    base_url: StrictStr = Field(pattern=r"^https?://[^\s/]+", description="e.g. https://api.openai.com/v1")
    api_key_env: Optional[StrictStr] = Field(None, description="Environment variable of the workers holding the key")
    api_key_secret: Optional[StrictStr] = Field(None, description="Request secret holding the key")
    params: dict[str, Any] = Field(default_factory=dict, description="Default params sent with every call")


class IntentRoute(Route):
    """The primary route of an intent, and the routes tried after it, in order."""

    fallbacks: list[Route] = Field(default_factory=list)


class Application(BaseModel):
    model_config = ConfigDict(extra="forbid")

    intents: dict[StrictStr, IntentRoute] = Field(min_length=1)
    default_intent: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _default_is_known(self) -> Application:
        if self.default_intent is not None and self.default_intent not in self.intents:
            raise ValueError(f"default_intent {self.default_intent!r} is not one of the intents")
        return self

    def route(self, intent: str | None) -> tuple[str, IntentRoute]:
        """The intent a call names (or the default, or the only one) and its route."""
        if intent is None:
            intent = self.default_intent or (next(iter(self.intents)) if len(self.intents) == 1 else None)
            if intent is None:
                raise KeyError("the call names no intent and the application has no default_intent")
        if intent not in self.intents:
            raise KeyError(f"no intent {intent!r}; known: {', '.join(sorted(self.intents))}")
        return intent, self.intents[intent]


class Applications:
    """Store and read the applications of an account."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def put(self, account_id: str, name: str, application: Application) -> bool:
        """Create or replace ``name``; True when it is new."""
        return bool(self.redis.hset(keys.applications(account_id), name, application.model_dump_json()))

    def get(self, account_id: str, name: str) -> Application:
        raw = self.redis.hget(keys.applications(account_id), name)
        if raw is None:
            raise NotFound(f"no application named {name!r}")
        return Application.model_validate_json(raw)

    def list(self, account_id: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """A page of the account's applications by name, and the total."""
        names = sorted(n.decode() for n in self.redis.hkeys(keys.applications(account_id)))
        page = names[offset:offset + limit]
        raws = self.redis.hmget(keys.applications(account_id), page) if page else []
        return [{"name": n, **json.loads(r)} for n, r in zip(page, raws) if r is not None], len(names)
