"""Run records: ``GET /api/v1/runs/{request_id}`` and ``GET /api/v1/workflows/{ref}/runs``."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from flask import Blueprint, jsonify, request

from flowpool.errors import NotFound, RequestError
from flowpool.run import RunRecord, RunStatus

from .parsing import page_args, paginated
from .services import Services, authenticate, services
from .streaming import stream_response

bp = Blueprint("runs", __name__, url_prefix="/api/v1")


def run_view(svc: Services, record: RunRecord, full: bool = True) -> dict[str, Any]:
    """A run as the API shows it; never the secrets, which are not stored at all.

    A running run's record gets its log lines and chunks with its end: till
    then they are read from their streams, as far as they have come.
    """
    if full and record.status == RunStatus.RUNNING.value:
        chunks, logs, cut = svc.runs.so_far(record.request_id)
        return replace(record, logs=logs, logs_truncated=cut).to_view(chunks)
    chunks = svc.runs.chunks(record.request_id) if full and record.chunk_count else []
    return record.to_view(chunks, full=full)


def _own_run(svc: Services, account_id: str, request_id: str) -> RunRecord:
    """The account's run record, or the same 404 whether it exists elsewhere or not."""
    record = svc.runs.get(request_id)
    if record is None or record.account != account_id:
        raise NotFound(f"no run with request_id {request_id!r}")
    return record


@bp.get("/runs/<request_id>")
def get_run(request_id: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    return jsonify({"data": run_view(svc, _own_run(svc, account.id, request_id))})


@bp.get("/workflows/<ref>/runs")
def list_runs(ref: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    offset, limit = page_args()
    svc.workflows.get(account.id, ref)
    ids, total = svc.runs.list_for_workflow(account.id, ref, offset, limit)
    items = [run_view(svc, r, full=False) for r in svc.runs.get_many(ids) if r is not None]
    return jsonify(paginated(items, total, offset, limit))


@bp.get("/sessions/<session_id>")
def get_session(session_id: str):  # type: ignore[no-untyped-def]
    """The runs of a session, oldest first, each with its model calls."""
    svc, account = services(), authenticate()
    offset, limit = page_args()
    ids, total = svc.runs.list_for_session(account.id, session_id, offset, limit)
    if total == 0:
        raise NotFound(f"no session {session_id!r}")
    items = [run_view(svc, r) for r in svc.runs.get_many(ids) if r is not None and r.account == account.id]
    calls = sum((item["model_calls"] for item in items), [])
    return jsonify({"data": {"session_id": session_id, "runs": items, "model_calls": calls},
                    "pagination": {"total": total, "offset": offset, "limit": limit}})


@bp.get("/runs/<request_id>/stream")
def stream_run(request_id: str):  # type: ignore[no-untyped-def]
    """Follow a run as SSE from the start, or resume after ``Last-Event-ID``; with ``?logs=true`` its log lines too.

    Log lines come as ``event: log`` events in order with the chunks (see
    :func:`~.streaming.stream_response`), and every event's id is then
    ``<events entry id>.<log entry id>``, so Last-Event-ID resumes both;
    without the opt-in the stream is the one an invoke with ``"stream":
    true`` gets. A cache hit, which has no log lines of its own, streams as
    without it.
    """
    svc, account = services(), authenticate()
    logs = _flag("logs")
    record = _own_run(svc, account.id, request_id)
    source = record.origin_request_id or request_id  # a cache hit follows the run it came from
    logs = logs and not record.origin_request_id
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or ("0-0.0-0" if logs else "0-0")
    if not re.fullmatch(r"\d+-\d+\.\d+-\d+" if logs else r"\d+-\d+", after):
        example = "1700000000000-0.1700000000000-1" if logs else "1700000000000-0"
        raise RequestError(f"Last-Event-ID must be an event id of this stream, like {example}, got {after!r}",
                           param="Last-Event-ID")
    settings = svc.settings
    run_seconds = float(record.timeout_seconds or settings.default_timeout_seconds) + settings.run_deadline_slack
    events = svc.runs.events(source, settings.queue_wait_seconds, run_seconds, after=after,
                             keepalive=settings.stream_keepalive_seconds, logs=logs)
    return stream_response(svc.runs, f"workflow:{record.workflow}", request_id, record.session_id or "",
                           events, "HIT" if record.cache_hit else "MISS")


def _flag(name: str) -> bool:
    """A true/false query parameter (absent: false); a 400 naming it for anything else."""
    raw = request.args.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise RequestError(f"{name} must be true or false, got {raw!r}", param=name)
    return raw in ("true", "1")
