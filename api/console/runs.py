"""The console's runs pages: the account's runs (filtered, live), one run (header, timeline, output, calls; live
while it goes) and one session (its runs on one timeline).

A run page shows what the run sent, chunks and log lines, in one list in the order it sent them. While its log
stream is there (the run goes, or ended less than LOG_TAIL_SECONDS ago) each line says how many chunks came before
it, so the order is exact; after that the record's lines are put among the chunks by their times (a chunk's time
is its stream entry id: when its batch was written, so a line logged just before a chunk in the same batch may
show after it). While the run goes, the page follows ``/console/runs/<id>/stream`` (the API's stream with log
lines, resumed after what the page shows) and polls its detail fragment, which answers 286 once the run has ended
so htmx stops polling after one last render.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from flask import Response, request

from flowpool import keys
from flowpool.errors import NotFound
from flowpool.run import RunRecord, RunStatus

from ..runs import follow_run
from ..services import Services, services
from . import bp
from .common import render, signed_in
from .timeline import Timeline, build, run_anchor

PAGE_SIZE = 50
SESSION_RUNS = 200  # the most runs a session's page draws
WORKFLOWS_LISTED = 500  # the workflows offered in the filter's select
WINDOWS = {"15m": 900, "1h": 3600, "24h": 86400, "7d": 7 * 86400, "all": None}
WINDOW_LABELS = {"15m": "Last 15 minutes", "1h": "Last hour", "24h": "Last 24 hours", "7d": "Last 7 days",
                 "all": "All kept runs"}
DEFAULT_WINDOW = "all"
STATUSES = tuple(s.value for s in RunStatus)
ACTIVE = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)

# htmx stops polling an element whose request is answered with this status (and still swaps the answer in).
STOP_POLLING = 286


@dataclass(frozen=True)
class Filters:
    """The runs page's query: what the URL holds (filters and the page's cursor), nothing else."""

    workflow: str = ""
    status: str = ""
    session_id: str = ""
    window: str = DEFAULT_WINDOW
    until: float | None = None

    @classmethod
    def from_args(cls, args: Any) -> Filters:
        """The filters of a request's query string; anything unknown falls back to its default."""
        status = args.get("status", "")
        window = args.get("window", DEFAULT_WINDOW)
        try:
            until: float | None = float(args.get("until", ""))
        except ValueError:
            until = None
        return cls(workflow=args.get("workflow", "").strip()[:200], status=status if status in STATUSES else "",
                   session_id=args.get("session_id", "").strip()[:200],
                   window=window if window in WINDOWS else DEFAULT_WINDOW, until=until)

    @property
    def any(self) -> bool:
        """Whether anything narrows the list."""
        return bool(self.workflow or self.status or self.session_id or self.window != DEFAULT_WINDOW)

    def query(self, **changes: Any) -> str:
        """The query string of these filters (with ``changes``), defaults left out."""
        values = {"workflow": self.workflow, "status": self.status, "session_id": self.session_id,
                  "window": self.window if self.window != DEFAULT_WINDOW else "", "until": self.until}
        values.update(changes)
        return urlencode({k: (repr(v) if isinstance(v, float) else v) for k, v in values.items() if v})


def _list(svc: Services, account_id: str, filters: Filters, now: float) -> tuple[list[RunRecord], float | None]:
    """A page of the account's runs under ``filters``, newest first, and the cursor of the next page."""
    seconds = WINDOWS[filters.window]
    return svc.runs.list_runs(account_id, workflow=filters.workflow or None,
                              status={filters.status} if filters.status else None,
                              session_id=filters.session_id or None,
                              since=now - seconds if seconds else None, until=filters.until, limit=PAGE_SIZE)


def workflow_url(ref: str, version: str | None = None) -> str:
    """The console page of a workflow (at ``version``)."""
    return f"/console/workflows/{quote(ref, safe='')}" + (f"?version={quote(version, safe='')}" if version else "")


def run_url(request_id: str) -> str:
    """The console page of a run."""
    return f"/console/runs/{quote(request_id, safe='')}"


def session_url(session_id: str) -> str:
    """The console page of a session."""
    return f"/console/sessions/{quote(session_id, safe='')}"


_LINKS = {"workflow_url": workflow_url, "run_url": run_url, "session_url": session_url,
          "run_anchor": run_anchor}


def _row(record: RunRecord) -> dict[str, Any]:
    """What the runs table shows of a run."""
    total = (record.finished_at - record.queued_at) * 1000 if record.finished_at and record.queued_at else None
    return {"record": record, "total_ms": total, "queue_ms": _between(record.queued_at, record.started_at),
            "run_ms": _between(record.started_at, record.finished_at)}


def _between(start: float | None, end: float | None) -> float | None:
    return (end - start) * 1000 if start and end else None


@bp.get("/runs")
def runs_page() -> Response:
    """The account's runs, newest first, filtered by the query string; the first page updates itself."""
    account = signed_in()
    svc = services()
    filters = Filters.from_args(request.args)
    records, next_until = _list(svc, account.id, filters, time.time())
    workflows, _ = svc.workflows.list(account.id, 0, WORKFLOWS_LISTED)
    refs = sorted(w["workflow_ref_name"] for w in workflows)
    return render("console/runs.html", title="Runs", nav="runs", filters=filters, rows=[_row(r) for r in records],
                  next_until=next_until, refs=refs, statuses=STATUSES, windows=WINDOW_LABELS, **_LINKS)


@bp.get("/runs/rows")
def runs_rows() -> Response:
    """The runs table's rows for the same query (htmx polls it on the first page), and its pager out of band."""
    account = signed_in()
    svc = services()
    filters = Filters.from_args(request.args)
    records, next_until = _list(svc, account.id, filters, time.time())
    return render("console/_runs_rows.html", title="Runs", nav="runs", filters=filters,
                  rows=[_row(r) for r in records], next_until=next_until, **_LINKS)


def _own(svc: Services, account_id: str, request_id: str) -> RunRecord:
    """The account's run, or the same 404 whether the run is another account's or there is none."""
    record = svc.runs.get(request_id)
    if record is None or record.account != account_id:
        raise NotFound(f"no run with request_id {request_id!r} in this account")
    return record


def _output(svc: Services, record: RunRecord) -> tuple[list[dict[str, Any]], str, bool]:
    """What the run sent, chunks and log lines in order; the stream cursor past them; whether its stream is done.

    Both streams are read in one MULTI: a snapshot, so the cursor resumes right after what is shown.
    """
    pipe = svc.redis.pipeline(transaction=True)
    pipe.xrange(keys.run_events(record.request_id))
    pipe.xrange(keys.run_logs(record.request_id))
    entries, lines = pipe.execute()
    chunks: list[dict[str, Any]] = []
    done = False
    for entry_id, fields in entries:
        kind = fields.get(b"kind")
        if kind == b"done":
            done = True
        elif kind == b"chunk":
            data = json.loads(fields[b"data"])
            chunks.append({"kind": "chunk", "entry": entry_id.decode(), "time": _entry_time(entry_id),
                           "type": data.get("type"), "content": data.get("content"), "index": data.get("index")})
    streamed = [(int(f[b"after"]), e.decode(), json.loads(f[b"data"])) for e, f in lines]
    kept = record.logs or []
    cursor = f"{entries[-1][0].decode() if entries else '0-0'}.{lines[-1][0].decode() if lines else '0-0'}"
    if record.status in ACTIVE or len(streamed) >= len(kept):
        return _by_place(chunks, streamed), cursor, done
    return _by_time(chunks, kept), cursor, done


def _log_item(line: dict[str, Any], entry: str = "") -> dict[str, Any]:
    return {"kind": "log", "entry": entry, "time": line.get("time"), "level": line.get("level"),
            "msg": line.get("msg"), "fields": line.get("fields")}


def _by_place(chunks: list[dict[str, Any]], lines: list[tuple[int, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Chunks and lines, each line before the first chunk it was not logged after."""
    items: list[dict[str, Any]] = []
    n = 0
    for position, chunk in enumerate(chunks):
        place = chunk["index"] if isinstance(chunk["index"], int) else position
        while n < len(lines) and lines[n][0] <= place:
            items.append(_log_item(lines[n][2], lines[n][1]))
            n += 1
        items.append(chunk)
    items.extend(_log_item(line, entry) for _, entry, line in lines[n:])
    return items


def _by_time(chunks: list[dict[str, Any]], lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunks and the record's lines merged by time (each list keeps its own order)."""
    items: list[dict[str, Any]] = []
    n = 0
    for chunk in chunks:
        while n < len(lines) and _time_of(lines[n]) <= chunk["time"]:
            items.append(_log_item(lines[n]))
            n += 1
        items.append(chunk)
    items.extend(_log_item(line) for line in lines[n:])
    return items


def _time_of(line: dict[str, Any]) -> float:
    value = line.get("time")
    return float(value) if isinstance(value, (int, float)) else 0.0


def _entry_time(entry_id: bytes) -> float:
    """When a stream entry was added: its id's milliseconds."""
    return int(entry_id.split(b"-")[0]) / 1000


def _detail(svc: Services, record: RunRecord, now: float) -> dict[str, Any]:
    """What the run page and its detail fragment show of a run."""
    items, cursor, done = _output(svc, record)
    live = record.status in ACTIVE and not done
    usage = record.usage if isinstance(record.usage, dict) else {}
    timeline = build([record], now)
    return {"record": record, "live": live, "items": items, "cursor": cursor, "timeline": timeline,
            "calls": [row for row in timeline.rows if row.kind != "run"], "usage": usage,
            "queue_ms": _between(record.queued_at, record.started_at),
            "run_ms": _between(record.started_at, record.finished_at),
            "total_ms": _between(record.queued_at, record.finished_at),
            "error": record.error if isinstance(record.error, dict) else None, **_LINKS}


@bp.get("/runs/<request_id>")
def run_page(request_id: str) -> Response:
    """One run: header, timeline, output, error, calls, input and output; live while it goes."""
    account = signed_in()
    svc = services()
    record = _own(svc, account.id, request_id)
    detail = _detail(svc, record, time.time())
    return render("console/run.html", title=f"Run {request_id}", nav="runs", **detail)


@bp.get("/runs/<request_id>/detail")
def run_detail(request_id: str) -> Response:
    """The run page's live part; 286 once the run has ended, so htmx stops polling after swapping it in."""
    account = signed_in()
    svc = services()
    record = _own(svc, account.id, request_id)
    detail = _detail(svc, record, time.time())
    return render("console/_run_detail.html", title=f"Run {request_id}", nav="runs",
                  status=200 if detail["live"] else STOP_POLLING, **detail)


@bp.get("/runs/<request_id>/stream")
def run_stream(request_id: str) -> Response:
    """The run's chunks and log lines as SSE (the API's own stream with ``logs=true``), then ``[DONE]``.

    The page passes ``?after=`` (the cursor past what it shows); a reconnecting EventSource's Last-Event-ID wins.
    """
    account = signed_in()
    svc = services()
    _own(svc, account.id, request_id)
    after = request.headers.get("Last-Event-ID") or request.args.get("after") or None
    return follow_run(svc, account, request_id, logs=True, after=after)


@bp.get("/sessions/<session_id>")
def session_page(session_id: str) -> Response:
    """A session's runs on one timeline, then as a table; a 404 with a hint when the account has none of it."""
    account = signed_in()
    svc = services()
    ids, total = svc.runs.list_for_session(account.id, session_id, 0, SESSION_RUNS)
    records = [r for r in svc.runs.get_many(ids) if r is not None and r.account == account.id]
    if not records:
        raise NotFound(f"no runs of session {session_id!r} in this account: a session's runs are kept as long as "
                       f"their records ({svc.settings.run_ttl_seconds // 86400} days); pass a session_id when "
                       "invoking to group runs into a session")
    timeline: Timeline = build(records, time.time())
    rows = [_row(r) for r in sorted(records, key=lambda r: r.queued_at or 0, reverse=True)]
    return render("console/session.html", title=f"Session {session_id}", nav="runs", session_id=session_id,
                  timeline=timeline, rows=rows, total=total, shown=len(records),
                  live=any(r.status in ACTIVE for r in records), **_LINKS)
