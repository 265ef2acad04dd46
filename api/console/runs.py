"""The console's runs pages: the account's runs (filtered, live), one run (header, timeline, output, calls; live
while it goes) and one session (its runs on one timeline).

A run page shows what the run sent, chunks and log lines, in one list in the order it sent them (the newest
OUTPUT_ITEMS of them: a note says how many earlier ones are not shown). While its log stream is there (the run
goes, or ended less than LOG_TAIL_SECONDS ago) each line says how many chunks came before it, so the order is
exact; after that the record's lines are put among the chunks by their times (a chunk's time is its stream entry
id: when its batch was written, so a line logged just before a chunk in the same batch may show after it).

While the run goes, the page's output list belongs to the stream it follows, ``/console/runs/<id>/stream`` (the
API's stream with log lines, resumed after what the page rendered), and the page polls only its detail fragment
(header, timeline, calls, error; the output once it has ended, out of band), which answers 286 once the run has
ended so htmx stops polling after one last render. A running run's calls come from its live list (its record gets
them with its end): each as far as it has come, one still going drawn up to now and marked running. The runs
table's rows fragment answers 204 (nothing to swap) when the rows are the ones the page shows: the page sends their
fingerprint (FINGERPRINT_HEADER) with each poll.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from flask import Response, redirect, request

from flowpool import keys
from flowpool.errors import NotFound, RequestError
from flowpool.run import STATUSES, UNENDED, RunRecord

from ..runs import follow_run, own_run, time_arg
from ..services import Services, services
from . import bp
from .common import render, signed_in
from .timeline import LOCAL_RUN, Timeline, build, is_preview, run_anchor

PAGE_SIZE = 50
SESSION_RUNS = 200  # the most runs a session's page draws
WORKFLOWS_LISTED = 500  # the workflows offered in the filter's select
WINDOWS = {"15m": 900, "1h": 3600, "24h": 86400, "7d": 7 * 86400, "all": None}
WINDOW_LABELS = {"15m": "Last 15 minutes", "1h": "Last hour", "24h": "Last 24 hours", "7d": "Last 7 days",
                 "all": "All kept runs"}
DEFAULT_WINDOW = "all"

# htmx stops polling an element whose request is answered with this status (and still swaps the answer in).
STOP_POLLING = 286
# htmx swaps nothing for a 204: a poll whose answer would not change the page.
UNCHANGED = 204
# The header in which the runs page sends the fingerprint of the rows it shows, and gets the new one.
FINGERPRINT_HEADER = "X-Console-Fingerprint"
OUTPUT_ITEMS = 2000  # the most chunks and log lines a run's page renders (the newest)


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
        """The filters of a request's query string; anything unknown falls back to its default (an ``until`` the
        API's listing would refuse too: not finite, negative, not a time)."""
        status = args.get("status", "")
        window = args.get("window", DEFAULT_WINDOW)
        try:
            until = time_arg(args, "until")
        except RequestError:
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


SHORT_ID = 12  # the characters of a long id a table shows (its link and title keep it whole)


def short_id(value: str) -> str:
    """An id as a table shows it: whole when short, else its first SHORT_ID characters and an ellipsis.

    Generated ids (``req_`` and ``sess_`` and 32 hex digits) differ in their first characters already; an id
    only a few characters over the cut stays whole, since cutting it would save next to nothing.
    """
    return value if len(value) <= SHORT_ID + 8 else value[:SHORT_ID] + "…"


_LINKS = {"workflow_url": workflow_url, "run_url": run_url, "session_url": session_url,
          "run_anchor": run_anchor, "short_id": short_id, "is_preview": is_preview, "local_run": LOCAL_RUN}


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
    rows = [_row(r) for r in records]
    return render("console/runs.html", title="Runs", nav="runs", filters=filters, rows=rows, next_until=next_until,
                  fingerprint=_fingerprint(rows, next_until), refs=refs, statuses=STATUSES, windows=WINDOW_LABELS,
                  **_LINKS)


@bp.get("/runs/rows")
def runs_rows() -> Response:
    """The runs table's rows and pager for the same query (htmx polls it on the first page); 204 when unchanged.

    Unchanged: the request's FINGERPRINT_HEADER (what the page shows) is the rows' own, which every answer sends.
    """
    account = signed_in()
    svc = services()
    filters = Filters.from_args(request.args)
    records, next_until = _list(svc, account.id, filters, time.time())
    rows = [_row(r) for r in records]
    fingerprint = _fingerprint(rows, next_until)
    if request.headers.get(FINGERPRINT_HEADER) == fingerprint:
        response = Response(status=UNCHANGED)
    else:
        response = render("console/_runs_rows.html", title="Runs", nav="runs", filters=filters, rows=rows,
                          next_until=next_until, **_LINKS)
    response.headers[FINGERPRINT_HEADER] = fingerprint
    return response


def _fingerprint(rows: list[dict[str, Any]], next_until: float | None) -> str:
    """What the runs table shows, in a few characters: its runs' ids, statuses and durations, and its pager."""
    text = json.dumps([[row["record"].request_id, row["record"].status, row["total_ms"]] for row in rows]
                      + [next_until])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@bp.get("/runs/go")
def go_to_run() -> Response:
    """The page of the run whose request id (or console URL) the runs page's "Go to run" field holds."""
    account = signed_in()
    text = request.args.get("request_id", "").strip()
    request_id = text.rstrip("/").rsplit("/", 1)[-1][:200]  # a pasted run page URL works too
    if not request_id:
        return redirect("/console/runs", 303)
    try:
        own_run(services(), account.id, request_id)
    except NotFound as exc:
        return _missing("Run", exc)
    return redirect(run_url(request_id), 303)


def _missing(what: str, exc: NotFound) -> Response:
    """The 404 page of a run or session that is not there (or not the account's), with a way back to the runs."""
    return render("console/error.html", title=f"{what} not found", nav="runs", status=exc.status, error=exc,
                  back_url="/console/runs", back_label="Back to the runs")


@dataclass(frozen=True)
class Output:
    """What a run page's output list shows: the newest items, how many earlier ones it leaves out, the cursor."""

    items: list[dict[str, Any]]
    hidden: int  # chunks and lines before the first item shown, not shown
    cursor: str  # the stream's event id past the last item (the page's stream resumes after it)
    done: bool  # the run's events stream has its end


def _output(svc: Services, record: RunRecord) -> Output:
    """What the run sent, chunks and log lines in order (the newest OUTPUT_ITEMS); the stream cursor past them.

    Both streams are read in one MULTI, from their ends (XREVRANGE COUNT): a snapshot, so the cursor resumes right
    after what is shown, and a run that sent a great many items costs no more than OUTPUT_ITEMS of each.
    """
    events, logs = keys.run_events(record.request_id), keys.run_logs(record.request_id)
    pipe = svc.redis.pipeline(transaction=True)
    pipe.xlen(events)
    pipe.xrevrange(events, count=OUTPUT_ITEMS + 1)  # one more: its end
    pipe.xlen(logs)
    pipe.xrevrange(logs, count=OUTPUT_ITEMS)
    n_entries, entries, n_lines, lines = pipe.execute()
    entries.reverse()
    lines.reverse()
    cursor = f"{entries[-1][0].decode() if entries else '0-0'}.{lines[-1][0].decode() if lines else '0-0'}"
    done = bool(entries) and entries[-1][1].get(b"kind") == b"done"
    chunks: list[dict[str, Any]] = []
    for entry_id, fields in entries:
        if fields.get(b"kind") == b"chunk":
            data = json.loads(fields[b"data"])
            chunks.append({"kind": "chunk", "entry": entry_id.decode(), "time": _entry_time(entry_id),
                           "type": data.get("type"), "content": data.get("content"), "index": data.get("index")})
    total_chunks = n_entries - (1 if done else 0)
    first_place = total_chunks - len(chunks)  # the place of the first chunk read, when it does not say its own
    for position, chunk in enumerate(chunks):
        chunk["place"] = chunk["index"] if isinstance(chunk["index"], int) else first_place + position
    chunks_cut = total_chunks > len(chunks)
    kept = record.logs or []
    if record.status in UNENDED or n_lines >= len(kept):
        streamed = [(int(f[b"after"]), e.decode(), json.loads(f[b"data"])) for e, f in lines]
        # Where one list was read from its end, the other's items from before its first are left out: the unread
        # items may lie among them, so their order would not be known.
        if chunks_cut and chunks:
            streamed = [line for line in streamed if line[0] >= chunks[0]["place"]]
        if n_lines > len(lines) and lines:
            chunks = [chunk for chunk in chunks if chunk["place"] >= int(lines[0][1][b"after"])]
        items, total = _by_place(chunks, streamed), total_chunks + n_lines
    else:
        if chunks_cut and chunks:
            kept = [line for line in kept if _time_of(line) >= chunks[0]["time"]]
        items, total = _by_time(chunks, kept), total_chunks + len(record.logs or [])
    shown = items[-OUTPUT_ITEMS:]
    return Output(shown, max(0, total - len(shown)), cursor, done)


def _stream_done(svc: Services, request_id: str) -> bool:
    """Whether the run's events stream has its end (its last entry)."""
    last = svc.redis.xrevrange(keys.run_events(request_id), count=1)
    return bool(last) and last[0][1].get(b"kind") == b"done"


def _log_item(line: dict[str, Any], entry: str = "") -> dict[str, Any]:
    return {"kind": "log", "entry": entry, "time": line.get("time"), "level": line.get("level"),
            "msg": line.get("msg"), "fields": line.get("fields")}


def _by_place(chunks: list[dict[str, Any]], lines: list[tuple[int, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Chunks and lines, each line before the first chunk it was not logged after."""
    items: list[dict[str, Any]] = []
    n = 0
    for chunk in chunks:
        while n < len(lines) and lines[n][0] <= chunk["place"]:
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


def _detail(record: RunRecord, live: bool, now: float) -> dict[str, Any]:
    """What the run page's polled part (header, timeline, calls, error) shows of a run."""
    usage = record.usage if isinstance(record.usage, dict) else {}
    timeline = build([record], now)
    return {"record": record, "live": live, "timeline": timeline,
            "calls": [row for row in timeline.rows if row.kind != "run"], "usage": usage,
            "queue_ms": _between(record.queued_at, record.started_at),
            "run_ms": _between(record.started_at, record.finished_at),
            "total_ms": _between(record.queued_at, record.finished_at),
            "error": record.error if isinstance(record.error, dict) else None, **_LINKS}


def playground_url(record: RunRecord) -> str | None:
    """The playground with the run's workflow and input filled in; None for a local run (no workflow to pick)."""
    if is_preview(record.workflow):
        return None
    return "/console/playground?" + urlencode({"workflow": record.workflow, "from": record.request_id})


@bp.get("/runs/<request_id>")
def run_page(request_id: str) -> Response:
    """One run: header, timeline, calls, error, output stream, output and input; live while it goes."""
    account = signed_in()
    svc = services()
    try:
        record = own_run(svc, account.id, request_id)
    except NotFound as exc:
        return _missing("Run", exc)
    output = _output(svc, record)
    live = record.status in UNENDED and not output.done
    record = svc.runs.with_live_calls(record)  # a running run's calls so far: its record gets them at its end
    return render("console/run.html", title=f"Run {request_id}", nav="runs", output=output,
                  output_items=OUTPUT_ITEMS, playground_url=playground_url(record), **_detail(record, live, time.time()))


@bp.get("/runs/<request_id>/detail")
def run_detail(request_id: str) -> Response:
    """The run page's polled part; 286 once the run has ended, so htmx stops polling after swapping it in.

    The output list is not in it (the page's stream fills that); the run's output comes with the end, out of band.
    """
    account = signed_in()
    svc = services()
    record = own_run(svc, account.id, request_id)
    live = record.status in UNENDED and not _stream_done(svc, request_id)
    record = svc.runs.with_live_calls(record)
    return render("console/_run_detail.html", title=f"Run {request_id}", nav="runs", oob=not live,
                  status=200 if live else STOP_POLLING, **_detail(record, live, time.time()))


@bp.get("/runs/<request_id>/stream")
def run_stream(request_id: str) -> Response:
    """The run's chunks and log lines as SSE (the API's own stream with ``logs=true``), then ``[DONE]``.

    The page passes ``?after=`` (the cursor past what it shows); a reconnecting EventSource's Last-Event-ID wins.
    """
    account = signed_in()
    svc = services()
    record = own_run(svc, account.id, request_id)
    after = request.headers.get("Last-Event-ID") or request.args.get("after") or None
    return follow_run(svc, account, request_id, logs=True, after=after, record=record)


def _session(svc: Services, account_id: str, session_id: str, now: float) -> dict[str, Any]:
    """What a session's page (and its polled part) shows; a 404 with a hint when the account has none of it."""
    ids, total = svc.runs.list_for_session(account_id, session_id, 0, SESSION_RUNS)
    records = [svc.runs.with_live_calls(r) for r in svc.runs.get_many(ids) if r is not None and r.account == account_id]
    if not records:
        raise NotFound(f"no runs of session {session_id!r} in this account: a session's runs are kept as long as "
                       f"their records ({svc.settings.run_ttl_seconds // 86400} days); pass a session_id when "
                       "invoking to group runs into a session")
    timeline: Timeline = build(records, now)
    rows = [_row(r) for r in sorted(records, key=lambda r: r.queued_at or 0, reverse=True)]
    return {"session_id": session_id, "timeline": timeline, "rows": rows, "total": total, "shown": len(records),
            "live": any(r.status in UNENDED for r in records), **_LINKS}


@bp.get("/sessions/<session_id>")
def session_page(session_id: str) -> Response:
    """A session's runs on one timeline, then as a table; live (polled) while any of them goes."""
    account = signed_in()
    try:
        session = _session(services(), account.id, session_id, time.time())
    except NotFound as exc:
        return _missing("Session", exc)
    return render("console/session.html", title=f"Session {session_id}", nav="runs", **session)


@bp.get("/sessions/<session_id>/detail")
def session_detail(session_id: str) -> Response:
    """The session page's polled part (timeline and runs table); 286 once none of its runs goes."""
    account = signed_in()
    session = _session(services(), account.id, session_id, time.time())
    return render("console/_session_detail.html", title=f"Session {session_id}", nav="runs",
                  status=200 if session["live"] else STOP_POLLING, **session)
