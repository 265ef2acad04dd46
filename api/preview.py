"""``POST /api/v1/workflows/preview``: run a script once, without uploading it under a name.

The body is an invocation's (``POST /workflow/chat/completions``) with
``script`` in place of ``model``, and ``accessories`` as an upload takes them.
The script is checked as an upload is (a 400 listing each problem with its
line), stored as a hidden workflow of the account that expires
(:mod:`flowpool.registry.previews`), and invoked; the answer is the invoke
route's (:func:`.invoke.respond`): JSON, or server-sent events with
``stream``, behind the same authentication, quotas and Idempotency-Key. The
result cache is off: a preview is run to see what the script does now.
"""
from __future__ import annotations

from typing import Optional

from flask import Blueprint, Response
from pydantic import Field, StrictStr, field_validator

from flowpool.registry.previews import Previews

from .body import own_body_limit
from .invoke import respond
from .models import Accessory, InvokeRequest
from .parsing import json_body, model_from
from .services import authenticate, mark, services
from .workflows import _accessories_from_json, _upload_limit

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
@own_body_limit(_upload_limit)  # it carries a script and its accessories, as an upload does
def preview() -> Response:
    """Run a script once, as an invocation of it: a hidden workflow that expires."""
    svc, account = services(), authenticate()
    body = model_from(PreviewRequest, json_body())
    previews = Previews(svc.workflows, svc.settings)
    ref = previews.store(account.id, body.script, _accessories_from_json(body))
    mark("store")
    try:
        return respond(svc, account, body.invocation(ref))
    finally:
        # Admitting the run recorded it in the preview's run index: that index expires with the preview.
        previews.expire_runs(account.id, ref)
