"""A run's (or a session's runs') timeline as rows of bars on one time axis; pure, no I/O.

Each run gives a row group: the run's own row (queued, then running, then
ended; a run not ended yet is drawn up to ``now``), then one row per call it
made, in the order they started: model and agent calls, HTTP calls and
workflows it called inline. A bar's ``offset`` and ``width`` are fractions of
the axis (0..1), clamped to it, and never narrower than ``MIN_WIDTH`` so an
instant call stays visible and clickable.

A call whose record has no ``started_at`` (records written before calls kept
it) is placed right after the call before it of the same list (model, HTTP or
workflow calls) in the same run, or at the run's start, as wide as its
latency, and marked ``estimated``: a script's calls mostly follow one
another, and the bar then still says how long the call took.
A call with a start but no latency (a model route of a record written before
failed routes kept theirs) is drawn until the next call of its list started
(its fallback).

A call still going (a running run's live calls, :mod:`flowpool.live_calls`:
status ``running``, no latency yet) is drawn from its start to ``now``, its
bar marked ``call-running`` and its row ``running``.

A record keeps a bounded number of HTTP calls and ends the list with an
``{"kind": "omitted", "count": N, "note": ...}`` entry: that is no call, so it
gives a note row (kind ``note``: no bar, no time) after the run's calls.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from flowpool.registry.workflows import PREVIEW_PREFIX
from flowpool.run import ENDED, RunRecord, RunStatus

from .formats import duration_text

__all__ = ["LOCAL_RUN", "MIN_WIDTH", "Axis", "Row", "Segment", "Tick", "Timeline", "build", "call_anchor",
           "is_preview", "run_anchor"]

# What a preview's run (``flowpool run FILE``) shows instead of its hidden workflow, which has no page.
LOCAL_RUN = "local run (flowpool run)"

# The narrowest bar drawn, as a fraction of the axis.
MIN_WIDTH = 0.005

# Tick steps the axis picks from (seconds): the first that gives at most _MAX_TICKS ticks.
_STEPS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
          3600, 7200, 21600, 43200, 86400)
_MAX_TICKS = 8


@dataclass(frozen=True)
class Segment:
    """One bar of a row: ``phase`` is queued, running, ended (the run's), call or call-running (a call still going)."""

    offset: float
    width: float
    phase: str


@dataclass(frozen=True)
class Row:
    """One line of the timeline: a run or one of its calls."""

    kind: str  # run | model | agent | http | workflow | note (calls made and not recorded: no bar)
    label: str
    anchor: str  # the id of its details row on the page
    status: str
    start: float | None  # unix seconds
    end: float | None
    duration_ms: float | None
    segments: tuple[Segment, ...]
    title: str  # the tooltip: the label, status, duration and more
    request_id: str = ""
    fallback: int = 0
    ttft: float | None = None  # where the first token came, as a fraction of the axis
    ttft_ms: float | None = None
    tokens: int | None = None
    estimated: bool = False  # its start was not recorded (see the module's docstring)
    running: bool = False  # a run (or its part) still going: drawn up to ``now``
    call: dict[str, Any] = field(default_factory=dict, compare=False)  # the call's record, for its details row


@dataclass(frozen=True)
class Tick:
    """A label on the axis at ``offset``."""

    offset: float
    label: str


@dataclass(frozen=True)
class Axis:
    """The time span drawn, in unix seconds, and its ticks."""

    start: float
    end: float
    ticks: tuple[Tick, ...]

    @property
    def span(self) -> float:
        """Its length in seconds (never 0)."""
        return max(self.end - self.start, 1e-3)

    def fraction(self, at: float) -> float:
        """Where ``at`` falls on the axis, clamped to 0..1."""
        return _clamp((at - self.start) / self.span)


@dataclass(frozen=True)
class Timeline:
    """Rows over one axis."""

    axis: Axis
    rows: tuple[Row, ...]


def is_preview(workflow: str | None) -> bool:
    """Whether a run's workflow is a preview's (``flowpool run FILE``): hidden, with no page of its own."""
    return bool(workflow) and str(workflow).startswith(PREVIEW_PREFIX)


def run_anchor(request_id: str) -> str:
    """The id of a run's details on a page."""
    return "run-" + _safe(request_id)


def call_anchor(request_id: str, kind: str, index: int) -> str:
    """The id of a call's details row on a page: its kind and place in its record's list."""
    return f"call-{_safe(request_id)}-{kind}-{index}"


def build(records: Sequence[RunRecord], now: float) -> Timeline:
    """The timeline of ``records`` (oldest first on the page) on one axis; ``now`` ends running runs' bars."""
    records = sorted((r for r in records if r.queued_at or r.started_at), key=lambda r: r.queued_at or r.started_at)
    spans = [_span(r, now) for r in records]
    calls = [_calls(r, span, now) for r, span in zip(records, spans)]
    ends = [end for _, end in spans] + [c["_end"] for group in calls for c in group]
    starts = [start for start, _ in spans] + [c["_start"] for group in calls for c in group]
    if not starts:
        return Timeline(Axis(now, now + 1, ()), ())
    start, end = min(starts), max(ends)
    axis = Axis(start, end if end > start else start + 1e-3, _ticks(start, end if end > start else start + 1e-3))
    rows: list[Row] = []
    for record, span, group in zip(records, spans, calls):
        rows.append(_run_row(record, span, axis, now))
        rows.extend(_call_row(record, call, axis) for call in group)
        rows.extend(_note_rows(record))
    return Timeline(axis, tuple(rows))


def _span(record: RunRecord, now: float) -> tuple[float, float]:
    """The run's start (queued) and end (finished, or ``now`` while it goes)."""
    start = record.queued_at or record.started_at or now
    if record.finished_at:
        end = record.finished_at
    elif record.status in ENDED:
        end = record.started_at or start  # ended without a finish time (a hit copied from its origin)
    else:
        end = max(now, start)
    return start, max(end, start)


def _calls(record: RunRecord, span: tuple[float, float], now: float) -> list[dict[str, Any]]:
    """The run's calls with their kind, index and (possibly estimated) start and end, in the order they started; one
    still going ends ``now``."""
    found: list[dict[str, Any]] = []
    for kind_list, items in (("model", record.model_calls), ("http", record.http_calls),
                             ("workflow", record.workflow_calls)):
        for index, call in enumerate(items or []):
            if isinstance(call, dict) and not _omitted(call):
                kind = call.get("kind") if kind_list == "model" and call.get("kind") == "agent" else kind_list
                found.append({**call, "_kind": kind, "_list": kind_list, "_index": index})
    run_start = record.started_at or span[0]
    # A call without a start follows the one before it in its own list (its record's list is in call order).
    previous_end: dict[str, float] = {}
    placed: list[dict[str, Any]] = []
    for position, call in enumerate(found):
        started = _number(call.get("started_at"))
        latency = _number(call.get("latency_ms"))
        seconds = latency / 1000 if latency is not None else 0.0
        if started is None:
            call["_estimated"] = True
            started = previous_end.get(call["_list"], run_start)
        if _going(call) and latency is None:
            call["_running"] = True
            seconds = max(0.0, now - started)
        elif latency is None and not call.get("_estimated"):
            # No latency (a route that failed after its retries): it lasted until the next call of its list
            # started (its fallback), as far as the record tells.
            following = next((_number(c.get("started_at")) for c in found[position + 1:]
                              if c["_list"] == call["_list"] and _number(c.get("started_at")) is not None), None)
            if following is not None and following > started:
                seconds = following - started
                call["_until_next"] = True
        call["_start"], call["_end"] = started, started + seconds
        previous_end[call["_list"]] = call["_end"]
        placed.append(call)
    placed.sort(key=lambda c: (c["_start"], c["_list"], c["_index"]))
    return placed


def _run_row(record: RunRecord, span: tuple[float, float], axis: Axis, now: float) -> Row:
    start, end = span
    running = record.status not in ENDED
    segments: list[Segment] = []
    began = record.started_at
    if began and began > start:
        segments.append(Segment(*_bar(axis, start, began), "queued"))
        segments.append(Segment(*_bar(axis, began, end), "running" if running else "ended"))
    elif began or record.status != RunStatus.QUEUED.value:
        segments.append(Segment(*_bar(axis, start, end), "running" if running else "ended"))
    else:  # still queued: the whole bar is waiting
        segments.append(Segment(*_bar(axis, start, end), "queued"))
    segments = _no_overlap(segments)
    duration = (end - start) * 1000 if record.finished_at or running else None
    version = f"@{record.version}" if record.version else ""
    label = LOCAL_RUN if is_preview(record.workflow) else f"run {record.workflow}{version}"
    title = f"{label}: {record.status}" + (f", {duration_text(duration)}" if duration is not None else "")
    if running:
        title += " so far"
    if began and began > start:
        title += f" (queued {duration_text((began - start) * 1000)})"
    usage = record.usage or {}
    return Row(kind="run", label=label, anchor=run_anchor(record.request_id), status=record.status, start=start,
               end=end, duration_ms=duration, segments=tuple(segments), title=title, request_id=record.request_id,
               tokens=usage.get("total_tokens") if isinstance(usage, dict) else None, running=running)


def _call_row(record: RunRecord, call: dict[str, Any], axis: Axis) -> Row:
    kind = call["_kind"]
    label = _call_label(kind, call)
    latency = _number(call.get("latency_ms"))
    running = bool(call.get("_running"))
    if running:  # how long it has gone so far
        latency = (call["_end"] - call["_start"]) * 1000
    status = str(call.get("status") or "unknown")
    fallback = int(_number(call.get("fallback")) or 0)
    ttft_ms = _number(call.get("ttft_ms"))
    ttft = axis.fraction(call["_start"] + ttft_ms / 1000) if ttft_ms is not None and kind in ("model", "agent") \
        else None
    tokens = _number(call.get("total_tokens")) if kind in ("model", "agent") else None
    parts = [label, "in progress" if running else status]
    if latency is not None:
        parts.append(duration_text(latency) + (" so far" if running else ""))
    if fallback > 0:
        parts.append(f"fallback #{fallback}")
    if ttft_ms is not None and ttft is not None:
        parts.append(f"first token after {duration_text(ttft_ms)}")
    if tokens is not None:
        parts.append(f"{int(tokens)} tokens")
    if call.get("_estimated"):
        parts.append("start not recorded: placed after the call before it")
    if call.get("_until_next"):
        parts.append("duration not recorded: drawn until the next call started")
    if call.get("error"):
        parts.append(str(call["error"])[:200])
    offset, width = _bar(axis, call["_start"], call["_end"])
    clean = {k: v for k, v in call.items() if not k.startswith("_")}
    if kind in ("model", "agent") and clean.get("workflow") == record.workflow:
        del clean["workflow"]  # the run's own: only a nested workflow's call says where it was made
    return Row(kind=kind, label=label, anchor=call_anchor(record.request_id, call["_list"], call["_index"]),
               status=status, start=call["_start"], end=call["_end"], duration_ms=latency,
               segments=(Segment(offset, width, "call-running" if running else "call"),), title=" · ".join(parts),
               request_id=record.request_id, fallback=fallback, ttft=ttft, ttft_ms=ttft_ms,
               tokens=int(tokens) if tokens is not None else None, estimated=bool(call.get("_estimated")),
               running=running, call=clean)


def _going(call: dict[str, Any]) -> bool:
    """Whether a call is still going: a running run's live entry of a call that has not ended."""
    return call.get("status") == "running"


def _omitted(call: dict[str, Any]) -> bool:
    """Whether a list's entry stands for calls the record did not keep (not a call itself)."""
    return call.get("kind") == "omitted"


def _note_rows(record: RunRecord) -> list[Row]:
    """A note row for each entry of the run's HTTP calls that counts calls made and not recorded."""
    rows = []
    for index, entry in enumerate(record.http_calls or []):
        if not isinstance(entry, dict) or not _omitted(entry):
            continue
        count = _number(entry.get("count"))
        what = f"{int(count)} more HTTP call{'' if count == 1 else 's'}" if count is not None else "More HTTP calls"
        label = f"{what} not recorded"
        note = str(entry.get("note") or "a run's record keeps a bounded number of HTTP calls")
        rows.append(Row(kind="note", label=label, anchor=call_anchor(record.request_id, "http", index),
                        status="omitted", start=None, end=None, duration_ms=None, segments=(),
                        title=f"{label}: {note}", request_id=record.request_id, call=dict(entry)))
    return rows


def _call_label(kind: str, call: dict[str, Any]) -> str:
    """What a call's row says: ``model echo``, ``agent helper``, ``HTTP GET host/path``, ``workflow ref@1.0.0``."""
    if kind == "agent":
        return f"agent {call.get('agent') or call.get('model') or '?'}"
    if kind == "model":
        return f"model {call.get('model') or '?'}"
    if kind == "http":
        host = str(call.get("host") or "?")
        port = call.get("port")
        if port and port not in (80, 443):
            host = f"{host}:{port}"
        return f"HTTP {call.get('method') or '?'} {host}{call.get('path') or '/'}"
    version = f"@{call['version']}" if call.get("version") else ""
    return f"workflow {call.get('workflow') or '?'}{version}"


def _bar(axis: Axis, start: float, end: float) -> tuple[float, float]:
    """A bar's offset and width on the axis: clamped to it, at least MIN_WIDTH wide."""
    offset = axis.fraction(start)
    width = max(axis.fraction(end) - offset, MIN_WIDTH)
    if offset + width > 1:
        offset = max(0.0, 1 - width)
    return round(offset, 6), round(min(width, 1.0), 6)


def _no_overlap(segments: list[Segment]) -> list[Segment]:
    """Segments that follow one another, the later ones moved past a widened earlier one (and kept in the axis)."""
    out: list[Segment] = []
    for seg in segments:
        if out:
            prev_end = out[-1].offset + out[-1].width
            if seg.offset < prev_end:
                width = max(MIN_WIDTH, seg.offset + seg.width - prev_end)
                offset = min(prev_end, 1 - width)
                seg = Segment(round(offset, 6), round(width, 6), seg.phase)
        out.append(seg)
    return out


def _ticks(start: float, end: float) -> tuple[Tick, ...]:
    """Ticks at a round step from the axis's start, labelled as time since it (``+1.5 s``)."""
    span = end - start
    step = next((s for s in _STEPS if span / s <= _MAX_TICKS), _STEPS[-1] * math.ceil(span / _STEPS[-1] / _MAX_TICKS))
    ticks = []
    n = 0
    while n * step <= span + 1e-9:
        ticks.append(Tick(round(n * step / span, 6), "0" if n == 0 else "+" + duration_text(n * step * 1000)))
        n += 1
    return tuple(ticks)


def _number(value: Any) -> float | None:
    """A finite number, or None (records are JSON: anything may be missing or odd)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def _safe(text: str) -> str:
    """``text`` usable in an HTML id and a URL fragment."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)
