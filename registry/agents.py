"""Agents: per account, an OpenAI-compatible agent endpoint or a workflow that answers like one."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from flowpool import keys

from .documents import AccountDocuments
from .names import BASE_URL, NAME

__all__ = ["Agent", "Agents"]


class Agent(BaseModel):
    """``{"base_url", "model"?, "api_key_env"?, "api_key_secret"?}`` or ``{"workflow": "<ref_name>"}``."""

    model_config = ConfigDict(extra="forbid")

    base_url: Optional[StrictStr] = Field(None, pattern=BASE_URL)
    model: Optional[StrictStr] = None
    api_key_env: Optional[StrictStr] = None
    api_key_secret: Optional[StrictStr] = None
    params: dict[str, Any] = Field(default_factory=dict)
    workflow: Optional[StrictStr] = Field(None, pattern=f"^{NAME}$")

    def key_envs(self) -> dict[str, tuple[str, str]]:
        """The environment variable the agent names as its key and where it sends it, by field path."""
        return {"api_key_env": (self.api_key_env, self.base_url or "")} if self.api_key_env else {}

    @model_validator(mode="after")
    def _one_kind(self) -> Agent:
        if (self.base_url is None) == (self.workflow is None):
            raise ValueError("an agent has either a base_url (an endpoint) or a workflow, not both or neither")
        return self


class Agents(AccountDocuments[Agent]):
    """The agents of an account."""

    model = Agent
    noun = "agent"
    key = staticmethod(keys.agents)
