"""``POST /api/v1/workflows/preview``: run a script once, without uploading it under a name.

The body is an invocation's (``POST /workflow/chat/completions``) with
``script`` in place of ``model``, and ``accessories`` as an upload takes them.
The script is checked as an upload is (a 400 listing each problem with its
line) and invoked as a hidden workflow of the account that expires
(:mod:`flowpool.registry.previews`), stored only once admission has queued
its run: a request refused by a quota, a size or its Idempotency-Key writes
nothing. The answer is the invoke route's (:func:`.invoke.respond`): JSON, or
server-sent events with ``stream``, behind the same authentication, quotas and
Idempotency-Key. The result cache is off: a preview is run to see what the
script does now.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import redis
from flask import Blueprint, Response
from pydantic import Field, StrictStr, field_validator

from flowpool.registry.previews import Previews

from .body import own_body_limit
from .invoke import respond
from .models import Accessory, InvokeRequest
from .parsing import json_body, model_from, request_idempotency_key
from .services import authenticate, mark, services
from .workflows import accessories_from_json, upload_limit

__all__ = ["PreviewRequest", "bp"]

bp = Blueprint("preview", __name__, url_prefix="/api/v1/workflows")


class PreviewRequest(InvokeRequest):
    """An invocation of ``script`` (with its ``accessories``) in place of a workflow named by ``model``."""

    model: Optional[StrictStr] = Field(None, description="not taken: a preview runs its script")
    cache: bool = Field(False, description="not taken: a preview is never answered from the cache")
    script: StrictStr = Field(min_length=1)
    accessories: list[Accessory] = []

    @field_validator("model")
    @classmethod
    def _model_format(cls, value: str | None) -> str | None:  # replaces InvokeRequest's check of the model
        if value is not None:
            raise ValueError("a preview runs its 'script': leave 'model' out")
        return value

    def invocation(self, ref: str) -> InvokeRequest:
        """The invocation of the stored preview ``ref``, with the result cache off."""
        fields = self.model_dump(exclude={"model", "script", "accessories", "cache"}, exclude_unset=True)
        return InvokeRequest.model_validate({**fields, "model": f"workflow:{ref}", "cache": False})


@bp.post("/preview")
@own_body_limit(upload_limit)  # it carries a script and its accessories, as an upload does
def preview() -> Response:
    """Run a script once, as an invocation of it: a hidden workflow that expires."""
    svc, account = services(), authenticate()
    body = model_from(PreviewRequest, json_body())
    previews = Previews(svc.workflows, svc.settings)
    prepared = previews.prepare(account.id, body.script, accessories_from_json(body.accessories))
    mark("check")

    def store() -> None:
        try:
            previews.store(prepared)
        except BaseException:
            # Admitting the run wrote the preview's run index; storing the preview would have given it its
            # lifetime. Given here instead, without letting a Redis error there hide the one being raised.
            with contextlib.suppress(redis.RedisError):
                previews.expire_runs(account.id, prepared.ref)
            raise

    return respond(svc, account, body.invocation(prepared.ref), request_idempotency_key(),
                   workflow=prepared.workflow, ready=store)
