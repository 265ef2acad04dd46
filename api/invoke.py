"""``POST /workflow/chat/completions``: invoke a workflow like a model.

The view parses the body, admits the request (:mod:`.admission`), sends a
queued run to the workers, and answers or streams (:mod:`.streaming`).
"""
from __future__ import annotations

from typing import Callable

from flask import Blueprint, Response, g

from flowpool.errors import RunError
from flowpool.registry import Account, ResolvedWorkflow
from flowpool.run import RunEnd

from .admission import Admission, admit, submit
from .models import InvokeRequest
from .parsing import json_body, model_from, request_idempotency_key
from .services import Services, authenticate, mark, services
from .streaming import Events, answer, replay, stream_response

__all__ = ["bp", "respond"]

bp = Blueprint("invoke", __name__)


@bp.post("/workflow/chat/completions")
def chat_completions() -> Response:
    """Invoke a workflow like a model: its chat.completion, as JSON or as server-sent events."""
    svc = services()
    account = authenticate()
    body = model_from(InvokeRequest, json_body())
    return respond(svc, account, body, request_idempotency_key())


def respond(svc: Services, account: Account, body: InvokeRequest, idempotency_key: str | None, *,
            workflow: ResolvedWorkflow | None = None, ready: Callable[[], None] | None = None) -> Response:
    """Admit ``body`` (with ``idempotency_key``, checked), hand its run to the workers, and answer: JSON, or
    server-sent events with ``stream``. What every route that invokes a workflow answers with.

    ``workflow`` and ``ready``: what ``body.model`` resolves to, known before
    it is stored, and what stores it once its run is queued (a preview's;
    :func:`.admission.admit`, :func:`.admission.submit`).
    """
    mark("parse")
    admission = admit(svc, account, body, idempotency_key, workflow=workflow)
    mark("begin")
    if admission.job is not None:
        submit(svc, admission, ready)
        mark("submit")
    # From here the run may be going: an error must name it and must not invite a retry (see errors.py).
    g.handed_over = admission.request_id
    if body.stream:
        cancel = admission.verdict == "queued" and body.on_disconnect == "cancel"
        response = stream_response(svc.runs, body.model, admission.request_id, admission.session_id,
                                   _events(svc, admission), admission.cache_header, cancel_on_disconnect=cancel,
                                   box=admission.box)
    else:
        end = admission.end
        if end is None:
            end = _wait(svc, admission)
            mark("wait")
        response = answer(body.model, admission.request_id, admission.session_id, end, admission.cache_header)
    if admission.verdict == "replay":
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _events(svc: Services, admission: Admission) -> Events:
    """What a streaming caller follows: a hit's stored chunks and end, or the run's events as they come."""
    if admission.end is not None:
        return replay(admission.chunks, admission.end)
    settings = svc.settings
    return svc.runs.events(admission.request_id, settings.queue_wait_seconds, admission.run_seconds,
                           keepalive=settings.stream_keepalive_seconds)


def _wait(svc: Services, admission: Admission) -> RunEnd:
    """The end of the run; an error raised while waiting names the run, so the caller can look it up.

    The run is with the workers by now: a Redis that fails here is an
    OutcomeUnavailable (not safe to retry), never a plain 503 (``RunStore.events``,
    and ``api/errors.py`` for what is raised after the hand-over).
    """
    request_id = admission.request_id
    try:
        end = svc.runs.wait(request_id, svc.settings.queue_wait_seconds, admission.run_seconds)
        return svc.runs.take_reply(request_id, end, admission.box)
    except RunError as exc:
        exc.details.setdefault("request_id", request_id)
        raise
