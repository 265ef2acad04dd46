"""Applications: per account, which model, provider and fallbacks serve each intent of a workflow."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from flowpool import keys

from .documents import AccountDocuments

__all__ = ["Application", "Applications", "Route", "IntentRoute"]

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


class Applications(AccountDocuments[Application]):
    """The applications of an account."""

    model = Application
    noun = "application"
    key = staticmethod(keys.applications)
