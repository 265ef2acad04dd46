"""Request bodies of the API, validated with pydantic; unknown fields are ignored like OpenAI does."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints, field_validator

from flowpool.registry.names import NAME
from flowpool.registry.validation import MAX_CACHE_TTL_SECONDS, MAX_TIMEOUT_SECONDS
from flowpool.registry.versions import DEFAULT_BUMP, ENV_NAME

__all__ = ["ActivateRequest", "InvokeRequest", "Message", "RunCreateRequest", "UploadRequest", "ValidateRequest",
           "parse_model"]

MODEL_PATTERN = re.compile(rf"^workflow:({NAME})(?:@(\d+\.\d+\.\d+))?$")


def parse_model(model: str) -> tuple[str, str | None]:
    """``workflow:<ref>[@<version>]`` split into ref and version."""
    match = MODEL_PATTERN.match(model)
    if match is None:
        raise ValueError(f"model must look like 'workflow:<ref_name>' or 'workflow:<ref_name>@<x.y.z>', got {model!r}")
    return match.group(1), match.group(2)


class Message(BaseModel):
    """One OpenAI-format chat message; extra keys (name, tool_calls...) are kept."""

    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: Union[StrictStr, list[Any], None] = None


class InvokeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    messages: Optional[list[Message]] = None
    input: Any = None
    session_id: Optional[StrictStr] = Field(None, max_length=200)
    stream: bool = False
    secrets: Optional[dict[str, StrictStr]] = None
    metadata: Optional[dict[str, Any]] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    cache: bool = True
    on_disconnect: Literal["continue", "cancel"] = "continue"

    @field_validator("model")
    @classmethod
    def _model_format(cls, value: str) -> str:
        parse_model(value)
        return value


class RunCreateRequest(InvokeRequest):
    """``POST /api/v1/runs``: an invocation answered at once with where to follow it, and perhaps a webhook."""

    webhook_url: Optional[StrictStr] = Field(None, max_length=2048)

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook_url must be an http or https URL with a host, got {value[:100]!r}")
        if parts.username or parts.password:
            raise ValueError("webhook_url must not carry credentials; the webhook is signed instead")
        try:
            port = parts.port  # raises for a port that is not a number from 0 to 65535
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"webhook_url has a port that is not a number from 1 to 65535: {value[:100]!r}")
        return value


class Accessory(BaseModel):
    # The key's rules (and the accessory's size and JSON) are checked by the registry, for multipart uploads too.
    key: StrictStr
    content_base64: StrictStr


class UploadRequest(BaseModel):
    """``POST /api/v1/workflows/upload`` (and ``POST /api/v1/workflows``): the fields the seed documents, and
    flowpool's own."""

    model_config = ConfigDict(extra="ignore")

    workflow_ref_name: StrictStr
    script: StrictStr = Field(min_length=1)
    description: Optional[StrictStr] = None
    timeout_seconds: Optional[float] = Field(None, gt=0, le=MAX_TIMEOUT_SECONDS, allow_inf_nan=False)
    cache_ttl_seconds: Optional[int] = Field(None, ge=0, le=MAX_CACHE_TTL_SECONDS)
    application_name: Optional[StrictStr] = Field(None, description="Bind to application by name; creates it "
                                                  "(with no intents) if missing.")
    env: Optional[dict[Annotated[str, StringConstraints(pattern=ENV_NAME)], StrictStr]] = None
    version_notes: Optional[StrictStr] = None
    version_bump: Literal["major", "minor", "patch"] = Field(DEFAULT_BUMP, description="Semver bump of a new "
                                                             "version. Defaults to minor.")
    publish_version: bool = Field(True, description="false: store the new version as a draft, not activated; "
                                  "POST /api/v1/workflows/{ref}/activate publishes it.")
    workflow_name: Optional[StrictStr] = Field(None, max_length=200, description="Display name. Defaults from "
                                               "workflow_ref_name.")
    execution_mode: Optional[Literal["sync", "async", "stream"]] = Field(None, description="Stored and shown; "
                                                                         "each caller chooses per request.")
    allow_inproc_nesting: Optional[bool] = None  # stored and shown: ctx.workflows.call always runs in the caller
    inproc_nested_refs: Optional[list[StrictStr]] = None
    application_id: Optional[Any] = Field(None, description="Refused: flowpool names applications; send "
                                          "application_name.")
    accessories: list[Accessory] = []
    queue: Optional[StrictStr] = None  # its name's rules are checked by the registry, for multipart uploads too
    # Seed fields flowpool has no counterpart for: refused (400) when they ask for something, never ignored.
    transform_enabled: Optional[bool] = None
    transform_session: Optional[StrictStr] = None
    input_schema: Optional[Any] = None
    output_schema: Optional[Any] = None


class ValidateRequest(BaseModel):
    code: StrictStr
    # execute (the default) and bundle check the whole script; flowpool has no transform or schema scripts.
    kind: Literal["execute", "transform", "schema", "bundle"] = "execute"
    input_schema: Optional[StrictStr] = None
    output_schema: Optional[StrictStr] = None
    transform_session: Optional[StrictStr] = None
    transform_enabled: Optional[bool] = None
    expect_workflow_context_import: Optional[bool] = None


class ActivateRequest(BaseModel):
    version: StrictStr = Field(pattern=r"^\d+\.\d+\.\d+$")
