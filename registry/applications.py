"""Applications: per account, which model, provider and fallbacks serve each intent of a workflow."""
from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationInfo, field_validator, model_validator
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from flowpool import keys
from flowpool.errors import NotFound, RequestError
from flowpool.settings import split_list

from .documents import AccountDocuments
from .names import BASE_URL

__all__ = ["EMPTY_APPLICATION", "Application", "Applications",
           "IntentRoute", "ProviderKeys", "Route"]


class ProviderKeys:
    """The operator's provider keys (``FLOWPOOL_PROVIDER_KEYS``): which worker variables accounts may name, and where to.

    Each entry is ``NAME`` or ``NAME@host``. With a host, the key is sent only
    to a ``base_url`` on that host: listing the operator's ``OPENAI_API_KEY``
    as ``OPENAI_API_KEY@api.openai.com`` lets accounts spend it, never send it
    to a server of their own. Without this check any account could have the
    workers send any of their environment variables (the Redis URL, another
    vendor's key) wherever it likes.
    """

    def __init__(self, setting: str) -> None:
        self.hosts: dict[str, str | None] = {}
        for entry in split_list(setting):
            name, _, host = entry.partition("@")
            self.hosts[name.strip()] = host.strip().lower() or None

    def refusal(self, name: str, base_url: str) -> str | None:
        """Why a route may not send variable ``name`` to ``base_url``; None when it may."""
        if name not in self.hosts:
            return (f"api_key_env {name!r} is not a provider key the operator allows: name one listed in "
                    "FLOWPOOL_PROVIDER_KEYS, or pass the key as a request secret with api_key_secret")
        host = self.hosts[name]
        if host is not None and _host(base_url) != host:
            return f"api_key_env {name!r} may only be sent to {host}, and base_url {base_url!r} is elsewhere"
        return None

    def check(self, named: dict[str, tuple[str, str]]) -> None:
        """Refuse (400) a document whose routes name a key they may not use; ``named``: path -> (name, base_url)."""
        for field, (name, base_url) in named.items():
            refusal = self.refusal(name, base_url)
            if refusal is not None:
                raise RequestError(refusal, param=field)


def _host(base_url: str) -> str | None:
    """The host a request to ``base_url`` goes to, as requests (urllib3) reads it; None for a URL it would not send.

    A stored document may predate the BASE_URL pattern (or bypass the API), so
    the call-time check parses with the sender's own parser and refuses user
    info and backslashes outright, on which parsers disagree.
    """
    if not re.fullmatch(BASE_URL, base_url):
        return None
    try:
        parsed = parse_url(base_url)
    except LocationParseError:
        return None
    return (parsed.host or "").lower() or None


class Route(BaseModel):
    """One OpenAI-compatible endpoint serving a model."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1)
    base_url: StrictStr = Field(pattern=BASE_URL, description="e.g. https://api.openai.com/v1")
    api_key_env: Optional[StrictStr] = Field(None, description="Environment variable of the workers holding the key")
    api_key_secret: Optional[StrictStr] = Field(None, description="Request secret holding the key")
    params: dict[str, Any] = Field(default_factory=dict, description="Default params sent with every call")

    def key_envs(self, path: str) -> dict[str, tuple[str, str]]:
        """The environment variable this route names as its key and where it sends it, by field path under ``path``."""
        return {f"{path}.api_key_env": (self.api_key_env, self.base_url)} if self.api_key_env else {}


class IntentRoute(Route):
    """The primary route of an intent, and the routes tried after it, in order."""

    fallbacks: list[Route] = Field(default_factory=list)

    def key_envs(self, path: str) -> dict[str, tuple[str, str]]:
        """The variables named as keys by this route and its fallbacks, by field path."""
        named = super().key_envs(path)
        for index, fallback in enumerate(self.fallbacks):
            named.update(fallback.key_envs(f"{path}.fallbacks.{index}"))
        return named


# The validation context under which a stored application is read: one an upload created (``application_name``
# naming an application the account lacked) has no intents until PUT /api/v1/applications/<name> gives it some.
STORED = {"stored": True}
# The document of such an application, as stored: the upload writes it (Workflows.store) in the transaction that
# stores the upload, unless the account has one of that name.
EMPTY_APPLICATION = '{"intents": {}}'


class Application(BaseModel):
    model_config = ConfigDict(extra="forbid")

    intents: dict[StrictStr, IntentRoute] = Field(json_schema_extra={"minProperties": 1})
    default_intent: Optional[StrictStr] = None

    @field_validator("intents")
    @classmethod
    def _some_intent(cls, value: dict[str, IntentRoute], info: ValidationInfo) -> dict[str, IntentRoute]:
        if not value and not (info.context or {}).get("stored"):
            raise ValueError("intents must name at least one intent")
        return value

    @model_validator(mode="after")
    def _default_is_known(self) -> Application:
        if self.default_intent is not None and self.default_intent not in self.intents:
            raise ValueError(f"default_intent {self.default_intent!r} is not one of the intents")
        return self

    def key_envs(self) -> dict[str, tuple[str, str]]:
        """Every environment variable the application names as a provider key, with its base_url, by field path."""
        named: dict[str, tuple[str, str]] = {}
        for intent, route in self.intents.items():
            named.update(route.key_envs(f"intents.{intent}"))
        return named

    def route(self, intent: str | None) -> tuple[str, IntentRoute]:
        """The intent a call names (or the default, or the only one) and its route; a KeyError saying why not."""
        if not self.intents:
            raise KeyError("it has no intents yet: configure them with PUT /api/v1/applications/<name>")
        if intent is None:
            intent = self.default_intent or (next(iter(self.intents)) if len(self.intents) == 1 else None)
            if intent is None:
                raise KeyError("the call names no intent and the application has no default_intent")
        if intent not in self.intents:
            raise KeyError(f"no intent {intent!r}; known: {', '.join(sorted(self.intents))}")
        return intent, self.intents[intent]


class Applications(AccountDocuments[Application]):
    """The applications of an account."""

    model = Application
    noun = "application"
    key = staticmethod(keys.applications)
    context = STORED  # one stored may have no intents yet (created by an upload's application_name)

    def delete(self, account_id: str, name: str) -> None:
        """Remove the application ``name`` (a 404 when the account has none of that name). Workflows naming it
        keep the name: their model calls fail, naming it as missing, until it is PUT again."""
        if not self.redis.hdel(keys.applications(account_id), name):
            raise NotFound(f"no application named {name!r}")
