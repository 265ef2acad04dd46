"""Run records: ``GET /api/v1/runs/{request_id}`` and ``GET /api/v1/workflows/{ref}/runs``."""
from __future__ import annotations

from typing import Any

import re

from flask import Blueprint, jsonify, request

from flowpool.errors import NotFound, RequestError

from .app import Services, authenticate, services
from .invoke import stream_response
from .parsing import page_args, paginated

bp = Blueprint("runs", __name__, url_prefix="/api/v1")

_SUMMARY = ("request_id", "workflow", "version", "status", "session_id", "cache_hit", "queued_at", "started_at",
            "finished_at", "worker")


def run_view(svc: Services, record: dict[str, Any], full: bool = True) -> dict[str, Any]:
    """A run as the API shows it; never the secrets, which are not stored at all."""
    view = {name: record.get(name) for name in _SUMMARY}
    view["cache_hit"] = bool(record.get("cache_hit"))
    view["timings"] = {
        "queued_at": record.get("queued_at"), "started_at": record.get("started_at"),
        "finished_at": record.get("finished_at"),
        "queue_ms": _ms(record.get("queued_at"), record.get("started_at")),
        "run_ms": _ms(record.get("started_at"), record.get("finished_at")),
    }
    view["error"] = record.get("error")
    if full:
        view.update(
            output=record.get("output"), usage=record.get("usage"), metadata=record.get("metadata"),
            timeout_seconds=record.get("timeout_seconds"), origin_request_id=record.get("origin_request_id"),
            model_calls=record.get("model_calls") or [], workflow_calls=record.get("workflow_calls") or [],
            logs=record.get("logs") or [],
            logs_truncated=bool(record.get("logs_truncated")),
            chunks=svc.runs.chunks(record["request_id"]) if record.get("chunk_count") else [],
        )
    return view


def _ms(start: float | None, end: float | None) -> float | None:
    return round((end - start) * 1000, 3) if start and end else None


def _own_run(svc: Services, account_id: str, request_id: str) -> dict[str, Any]:
    """The account's run record, or the same 404 whether it exists elsewhere or not."""
    record = svc.runs.get(request_id)
    if record is None or record.get("account") != account_id:
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
    svc.registry.get(account.id, ref)
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
    items = [run_view(svc, r) for r in svc.runs.get_many(ids) if r is not None and r.get("account") == account.id]
    calls = sum((item["model_calls"] for item in items), [])
    return jsonify({"data": {"session_id": session_id, "runs": items, "model_calls": calls},
                    "pagination": {"total": total, "offset": offset, "limit": limit}})


@bp.get("/runs/<request_id>/stream")
def stream_run(request_id: str):  # type: ignore[no-untyped-def]
    """Follow a run as SSE from the start, or resume after ``Last-Event-ID``."""
    svc, account = services(), authenticate()
    record = _own_run(svc, account.id, request_id)
    source = record.get("origin_request_id") or request_id  # a cache hit follows the run it came from
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    if not re.fullmatch(r"\d+-\d+", after):
        raise RequestError(f"Last-Event-ID must be a stream entry id like 1700000000000-0, got {after!r}",
                           param="Last-Event-ID")
    settings = svc.settings
    run_seconds = float(record.get("timeout_seconds") or settings.default_timeout_seconds) + settings.run_deadline_slack
    events = svc.runs.events(source, settings.queue_wait_seconds, run_seconds, after=after,
                             keepalive=settings.stream_keepalive_seconds)
    return stream_response(svc, f"workflow:{record.get('workflow')}", request_id, record.get("session_id") or "",
                           events, "HIT" if record.get("cache_hit") else "MISS")
