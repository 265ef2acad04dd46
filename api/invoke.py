"""``POST /workflow/chat/completions``: invoke a workflow like a model.

The view parses the body, admits the request (:mod:`.admission`), sends a
queued run to the workers, and answers or streams (:mod:`.streaming`).
"""
from __future__ import annotations

from flask import Blueprint, Response

from flowpool.errors import RunError
from flowpool.run import RunEnd

from .admission import Admission, admit, submit
from .models import InvokeRequest
from .parsing import json_body, model_from
from .services import Services, authenticate, mark, services
from .streaming import Events, answer, replay, stream_response

__all__ = ["bp"]

bp = Blueprint("invoke", __name__)


@bp.post("/workflow/chat/completions")
def chat_completions() -> Response:
    svc = services()
    account = authenticate()
    body = model_from(InvokeRequest, json_body())
    mark("parse")
    admission = admit(svc, account, body)
    mark("begin")
    if admission.job is not None:
        submit(svc, admission)
        mark("submit")
    if body.stream:
        cancel = admission.verdict == "queued" and body.on_disconnect == "cancel"
        return stream_response(svc.runs, body.model, admission.request_id, admission.session_id,
                               _events(svc, admission), admission.cache_header, cancel_on_disconnect=cancel,
                               box=admission.box)
    end = admission.end
    if end is None:
        end = _wait(svc, admission)
        mark("wait")
    return answer(body.model, admission.request_id, admission.session_id, end, admission.cache_header)


def _events(svc: Services, admission: Admission) -> Events:
    """What a streaming caller follows: a hit's stored chunks and end, or the run's events as they come."""
    if admission.end is not None:
        return replay(admission.chunks, admission.end)
    settings = svc.settings
    return svc.runs.events(admission.request_id, settings.queue_wait_seconds, admission.run_seconds,
                           keepalive=settings.stream_keepalive_seconds)


def _wait(svc: Services, admission: Admission) -> RunEnd:
    """The end of the run; an error raised while waiting names the run, so the caller can look it up."""
    request_id = admission.request_id
    try:
        end = svc.runs.wait(request_id, svc.settings.queue_wait_seconds, admission.run_seconds)
        return svc.runs.take_reply(request_id, end, admission.box)
    except RunError as exc:
        exc.details.setdefault("request_id", request_id)
        raise
