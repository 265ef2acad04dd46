"""Runs: started without waiting (``POST /api/v1/runs``), looked up (``GET /api/v1/runs/{request_id}``, which can
long-poll with ``?wait=N``), followed (``.../stream``) and listed (``GET /api/v1/runs``, newest first with filters
and a cursor; ``GET /api/v1/workflows/{ref}/runs``).

``POST /api/v1/runs`` takes the invoke body and passes the same admission
(:mod:`.admission`: schema, quotas, Idempotency-Key, cache); it answers 202
with the run's ``request_id``, ``status``, ``status_url`` and ``stream_url``,
at the top level of the body as the issue and SPEC name them, as soon as the
run is queued, or 200 with those and the run's fields beside them when the
cache (or an Idempotency-Key naming an ended run) answers at once. With ``webhook_url``,
the run's end is POSTed there, signed (``tasks/webhooks.py``); the run's view
shows the webhook's attempts.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import replace
from datetime import datetime
from typing import Any, Mapping

from flask import Blueprint, Response, g, jsonify, request, url_for

from flowpool.errors import NotFound, OutcomeUnavailable, RequestError, RunError
from flowpool.registry import Account
from flowpool.run import STATUSES, UNENDED, RunRecord, RunStatus

from .admission import Admission, admit, discard_quietly, submit
from .models import RunCreateRequest
from .parsing import MAX_PAGE, json_body, model_from, page_args, paginated, request_idempotency_key
from .services import Services, authenticate, mark, services
from .streaming import stream_response

__all__ = ["bp", "follow_run", "own_run", "run_view", "start_run", "started_headers", "time_arg"]

bp = Blueprint("runs", __name__, url_prefix="/api/v1")


def run_view(svc: Services, record: RunRecord, full: bool = True) -> dict[str, Any]:
    """A run as the API shows it; never the secrets, which are not stored at all.

    A running run's record gets its log lines, chunks and calls with its end:
    till then they are read from their streams and its live calls (each
    call's latest entry, one still going with status ``running``), as far as
    they have come.
    """
    if full and record.status == RunStatus.RUNNING.value:
        chunks, logs, cut = svc.runs.so_far(record.request_id)
        record = svc.runs.with_live_calls(record)
        return replace(record, logs=logs, logs_truncated=cut).to_view(chunks)
    chunks = svc.runs.chunks(record.request_id) if full and record.chunk_count else []
    return record.to_view(chunks, full=full)


def own_run(svc: Services, account_id: str, request_id: str) -> RunRecord:
    """The account's run record, or the same 404 whether it exists elsewhere or not."""
    record = svc.runs.get(request_id)
    if record is None or record.account != account_id:
        raise NotFound(f"no run with request_id {request_id!r}")
    return record


def _full_view(svc: Services, record: RunRecord) -> dict[str, Any]:
    """A run as GET /api/v1/runs/{id} shows it: everything kept of it, and its webhook (null without one)."""
    return {**run_view(svc, record), "webhook": svc.webhooks.view(record.request_id)}


@bp.post("/runs")
def create_run() -> Response:
    """Start a run and answer at once (202) with where to follow it; a cache hit answers 200 with the run."""
    svc, account = services(), authenticate()
    body = model_from(RunCreateRequest, json_body())
    idempotency_key = request_idempotency_key()
    if body.webhook_url is not None:
        _check_webhook_url(svc, body.webhook_url)
    body = body.model_copy(update={"stream": False})  # followed through stream_url, if at all
    mark("parse")
    admission = start_run(svc, account, body, idempotency_key, webhook_url=body.webhook_url)
    request_id = admission.request_id
    urls = {"status_url": url_for("runs.get_run", request_id=request_id),
            "stream_url": url_for("runs.stream_run", request_id=request_id)}
    # The keys at the top level, as the issue and SPEC name them (a hit's or an ended replay's run beside them).
    response = jsonify(_started(svc, admission, urls))
    response.status_code = 200 if admission.end is not None else 202
    response.headers["Location"] = urls["status_url"]
    response.headers.update(started_headers(admission))
    return response


def start_run(svc: Services, account: Account, body: RunCreateRequest, idempotency_key: str | None,
              webhook_url: str | None = None) -> Admission:
    """Admit ``body`` and hand a queued run to the workers, without waiting for it: what POST /api/v1/runs and
    the console's playground do. ``webhook_url`` (checked by the caller) is forgotten when nothing runs.

    Once this returns, the run may be going: an error of the request after it names the run and does not invite
    a retry (``g.handed_over``, read by errors.py).
    """
    admission = admit(svc, account, body, idempotency_key, webhook_url=webhook_url)
    mark("begin")
    if admission.job is not None:
        try:
            submit(svc, admission)
        except OutcomeUnavailable:
            raise  # the run may be going: its webhook stays, to tell its end
        except BaseException:
            if webhook_url is not None:  # nothing runs, and the caller is told so: no webhook is owed
                discard_quietly(svc, admission.request_id)
            raise
        mark("submit")
    g.handed_over = admission.request_id
    return admission


def started_headers(admission: Admission) -> dict[str, str]:
    """The headers of an answer naming a started run: its request id, whether the cache answered, and whether an
    Idempotency-Key replayed it."""
    headers = {"X-Request-Id": admission.request_id, "X-Cache": admission.cache_header}
    if admission.verdict == "replay":
        headers["Idempotent-Replayed"] = "true"
    return headers


def _started(svc: Services, admission: Admission, urls: dict[str, str]) -> dict[str, Any]:
    """What POST /api/v1/runs answers: the run's id, status and URLs; with the whole run when it has ended."""
    request_id = admission.request_id
    data: dict[str, Any] = {"request_id": request_id, "status": RunStatus.QUEUED.value, **urls}
    if admission.verdict == "queued":
        return data
    record = svc.runs.get(request_id)  # a hit's record, or the run a join or a replay follows
    if record is None:
        return data if admission.end is None else {**data, "status": admission.end.status}
    if admission.end is None:
        return {**data, "status": record.status}
    return {**_full_view(svc, record), **urls}


def _check_webhook_url(svc: Services, url: str) -> None:
    """A 400 naming the egress guard's reason when the workers could not POST to ``url``; the workers check again
    on every delivery (the address a name resolves to may change)."""
    # The guard is the workers' module (it brings urllib3's pool classes): loaded only by a request with a webhook.
    from flowpool.egress import EgressDenied, EgressPolicy

    try:
        EgressPolicy(svc.settings.egress_allow).check_url(url)
    except EgressDenied as exc:
        raise RequestError(f"webhook_url is refused by the egress guard: {exc}", param="webhook_url") from exc


@bp.get("/runs/<request_id>")
def get_run(request_id: str):  # type: ignore[no-untyped-def]
    """A run, and its webhook; with ``?wait=N``, answered when the run ends or after N seconds, whichever is first."""
    svc, account = services(), authenticate()
    wait = _wait_seconds(svc.settings.run_wait_max_seconds)
    record = own_run(svc, account.id, request_id)
    if wait > 0 and record.status in UNENDED:
        record = _await_end(svc, record, wait)
    return jsonify({"data": _full_view(svc, record)})


def _wait_seconds(longest: float) -> float:
    """The ``wait`` query parameter: seconds, at most ``longest`` (FLOWPOOL_RUN_WAIT_MAX_SECONDS); 0 when absent."""
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise RequestError(f"wait must be a number of seconds, 0 or more, got {raw[:40]!r}", param="wait")
    return min(seconds, longest)


# How often a long poll looks at its clock while the run sends nothing, and the least: a blocking XREAD of 0 ms
# would wait forever.
_WAIT_TICK_SECONDS = 0.25
_WAIT_TICK_FLOOR_SECONDS = 0.01


def _await_end(svc: Services, record: RunRecord, seconds: float) -> RunRecord:
    """The run's record once it has ended, or as it is after ``seconds``.

    It waits as an invoke's caller does (RunStore.events), so a run that no
    worker started in time, or whose worker was lost, is ended by it too.
    """
    settings = svc.settings
    request_id = record.request_id
    run_seconds = float(record.timeout_seconds or settings.default_timeout_seconds) + settings.run_deadline_slack
    give_up_at = time.monotonic() + seconds
    # A ping after every quiet tick, so the deadline is looked at even while nothing comes. Chunks still come
    # (chunks=True): they are what a busy run sends, and each is a look at the clock too (RunStore.events yields
    # no ping while entries keep arriving, so with chunks=False a chatty run would hold the poll past its wait).
    tick = max(_WAIT_TICK_FLOOR_SECONDS, min(_WAIT_TICK_SECONDS, seconds))
    events = svc.runs.events(request_id, settings.queue_wait_seconds, run_seconds, poll=tick, keepalive=tick)
    try:
        if time.monotonic() >= give_up_at:
            return svc.runs.get(request_id) or record
        for _, kind, _ in events:
            if kind == "done" or time.monotonic() >= give_up_at:
                break
    except RunError:
        pass  # ended by this waiter (never started, or its worker lost): its record says so now
    finally:
        events.close()  # type: ignore[attr-defined]
    return svc.runs.get(request_id) or record


@bp.get("/workflows/<ref>/runs")
def list_runs(ref: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    offset, limit = page_args()
    svc.workflows.get(account.id, ref)
    ids, total = svc.runs.list_for_workflow(account.id, ref, offset, limit)
    items = [run_view(svc, r, full=False) for r in svc.runs.get_summaries(ids) if r is not None]
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
    return follow_run(svc, account, request_id, logs,
                      request.headers.get("Last-Event-ID") or request.args.get("last_event_id"))


def follow_run(svc: Services, account: Account, request_id: str, logs: bool, after: str | None,
               record: RunRecord | None = None) -> Response:
    """The account's run as SSE from the start, or after the event id ``after``; with ``logs``, its log lines too.

    What ``GET /api/v1/runs/{request_id}/stream`` answers (see :func:`stream_run`), for any route that follows a
    run: a 404 for another account's run, a 400 naming Last-Event-ID for an ``after`` not of this stream.
    ``record``: the run's record, when the caller has read it and checked it is the account's (:func:`own_run`).
    """
    if record is None:
        record = own_run(svc, account.id, request_id)
    source = record.origin_request_id or request_id  # a cache hit follows the run it came from
    logs = logs and not record.origin_request_id
    after = after or ("0-0.0-0" if logs else "0-0")
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


@bp.get("/runs")
def list_all_runs():  # type: ignore[no-untyped-def]
    """The account's runs, newest first: filtered by workflow, status, session and queue time, paged by a cursor."""
    svc, account = services(), authenticate()
    args = request.args
    raw_status = args.get("status", "")
    status = {part.strip() for part in raw_status.split(",") if part.strip()}
    unknown = sorted(status - set(STATUSES))
    if unknown:
        raise RequestError(f"status must be one or more of {', '.join(sorted(STATUSES))} (comma-separated), got "
                           f"{unknown[0][:40]!r}", param="status")
    limit = _int_arg("limit", 50, 1, MAX_PAGE)
    records, next_until = svc.runs.list_runs(
        account.id, workflow=args.get("workflow") or None, status=status or None,
        session_id=args.get("session_id") or None, since=time_arg(args, "since"), until=time_arg(args, "until"),
        limit=limit)
    return jsonify({"data": [run_view(svc, r, full=False) for r in records], "next_until": next_until})


def time_arg(args: Mapping[str, str], name: str) -> float | None:
    """A point in time from a query string's ``name``: unix seconds (finite, 0 or more), or ISO 8601 with its
    offset; None when absent or empty; a RequestError (400) naming it otherwise. The API's run listing and the
    console's runs pages read their ``since`` and ``until`` with it."""
    raw = args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            raise RequestError(f"{name} must be unix seconds or an ISO 8601 time with its offset (like "
                               f"2025-01-31T12:00:00Z), got {raw[:40]!r}", param=name) from None
        value = when.timestamp()
    if not math.isfinite(value) or value < 0:
        raise RequestError(f"{name} must be unix seconds, 0 or more, got {raw[:40]!r}", param=name)
    return value


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    """A whole number from the query string, ``low`` to ``high``; a 400 naming it otherwise."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {raw[:40]!r}", param=name)
    return value
