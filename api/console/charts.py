"""The geometry of the console's charts: bars, lines, ticks and labels in SVG user units, computed without I/O.

The pages turn these into inline SVG in their templates (``console/_chart.html``):
presentation attributes and CSS classes only, since the console's CSP blocks
``style`` attributes. A chart's y axis starts at 0 and ends at a "nice" number
(1, 2 or 5 times a power of ten) at or above the largest value, so its ticks
read as round numbers.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from .formats import duration_text, format_number

__all__ = ["AxisTick", "Bar", "Chart", "Line", "Series", "Sparkline", "bar_chart", "nice_step", "nice_ticks",
           "runs_chart", "sparkline", "stats_summary"]

Formatter = Callable[[float], str]


@dataclass(frozen=True)
class AxisTick:
    """One labelled mark on an axis: its coordinate along that axis and its text."""

    pos: float
    label: str
    ts: float | None = None  # the moment it labels (unix seconds): the page may rewrite the label in local time


@dataclass(frozen=True)
class Bar:
    """One rectangle: where it is, its CSS class (its series) and the text of its tooltip.

    ``ts`` is the moment its slot starts, when the slots are times: the tooltip is then the slot's label, ": ",
    and ``detail``, so a page can rewrite the label part in the viewer's time zone.
    """

    x: float
    y: float
    width: float
    height: float
    css: str
    title: str
    ts: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Line:
    """One series drawn as lines: its unbroken runs of points (a bucket without a value breaks it)."""

    css: str
    label: str
    segments: tuple[tuple[tuple[float, float], ...], ...]

    @property
    def polylines(self) -> list[str]:
        """Each segment as the ``points`` attribute of a <polyline>."""
        return [" ".join(f"{x:.1f},{y:.1f}" for x, y in segment) for segment in self.segments]

    @property
    def points(self) -> list[tuple[float, float]]:
        """Every point, for markers (a segment of one point draws no line)."""
        return [point for segment in self.segments for point in segment]


@dataclass(frozen=True)
class Series:
    """Values to draw as stacked bars, one per slot, in CSS class ``css``; ``name`` labels them."""

    css: str
    name: str
    values: Sequence[float]


@dataclass(frozen=True)
class Chart:
    """A whole chart: its size, its plot area (left, top, right, bottom), what it draws and its axes."""

    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float
    bars: tuple[Bar, ...] = ()
    lines: tuple[Line, ...] = ()
    y_ticks: tuple[AxisTick, ...] = ()
    y2_ticks: tuple[AxisTick, ...] = ()  # the right-hand axis, of the lines (empty when there are none)
    x_ticks: tuple[AxisTick, ...] = ()
    y_label: str = ""
    y2_label: str = ""
    x_label: str = ""
    x_label_local: str = ""  # the x axis's name once a page showed its tick labels in the viewer's zone
    legend: tuple[tuple[str, str], ...] = field(default=())  # (css class, name) of each series


def nice_step(raw: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is at least ``raw`` (> 0)."""
    exponent = math.floor(math.log10(raw))
    base = 10.0 ** exponent
    for multiple in (1, 2, 5, 10):
        if multiple * base >= raw * (1 - 1e-9):  # 0.3/3 is 0.09999...: not a reason to step up
            return multiple * base
    return 10 * base  # not reached: 10 * base >= raw always


def nice_ticks(maximum: float, count: int = 4, integer: bool = False) -> list[float]:
    """Tick values from 0 up to a nice number at or above ``maximum``, about ``count`` steps apart; with
    ``integer`` (counts: runs, tokens) the steps are whole numbers.

    A maximum of 0 or less (nothing to show), or not finite, gives ``[0, 1]``: an
    axis needs a span, and any span reads the same over no data.
    """
    if not math.isfinite(maximum) or maximum <= 0:
        return [0.0, 1.0]
    step = nice_step(maximum / max(count, 1))
    if integer:
        step = max(step, 1.0)
    steps = math.ceil(maximum / step - 1e-9)
    digits = max(0, -math.floor(math.log10(step)))  # round away float noise such as 0.30000000000000004
    return [round(n * step, digits) for n in range(steps + 1)]


def _scale(value: float, top_value: float, top: float, bottom: float) -> float:
    """The y coordinate of ``value`` on an axis from 0 at ``bottom`` to ``top_value`` at ``top``."""
    return bottom - (value / top_value) * (bottom - top)


def _y_ticks(ticks: list[float], top: float, bottom: float, fmt: Formatter) -> tuple[AxisTick, ...]:
    return tuple(AxisTick(_scale(v, ticks[-1], top, bottom), fmt(v)) for v in ticks)


def _x_ticks(labels: Sequence[str], left: float, slot: float, most: int,
             stamps: Sequence[float] | None = None) -> tuple[AxisTick, ...]:
    """At most ``most`` labels, evenly spaced, each under the middle of its slot (with its slot's moment)."""
    if not labels:
        return ()
    every = max(1, math.ceil(len(labels) / max(most, 1)))
    return tuple(AxisTick(left + (i + 0.5) * slot, label, stamps[i] if stamps else None)
                 for i, label in enumerate(labels) if i % every == 0)


def bar_chart(labels: Sequence[str], series: Sequence[Series], *, width: int = 640, height: int = 200,
              y_label: str = "", x_label: str = "", fmt: Formatter = format_number, most_x_labels: int = 8,
              integer: bool = False, margins: tuple[float, float, float, float] = (44, 12, 12, 28),
              stamps: Sequence[float] | None = None) -> Chart:
    """Stacked bars, one slot per label, the series stacked in order from the axis up.

    ``integer``: the values are counts, so the ticks are whole numbers. ``margins`` are left, top, right and
    bottom: room for the tick labels. ``stamps``: the moment (unix seconds) each slot starts, when the slots are
    times; the ticks and bars then carry it (AxisTick.ts, Bar.ts) so a page can show them in the viewer's zone.
    """
    left, top, right_margin, bottom_margin = margins
    right, bottom = width - right_margin, height - bottom_margin
    totals = [sum(s.values[i] or 0 for s in series) for i in range(len(labels))]
    ticks = nice_ticks(max(totals, default=0), integer=integer)
    slot = (right - left) / len(labels) if labels else 0.0
    bars: list[Bar] = []
    for i, label in enumerate(labels):
        base = 0.0
        for s in series:
            value = s.values[i] or 0
            if value <= 0:
                continue
            y_top, y_base = _scale(base + value, ticks[-1], top, bottom), _scale(base, ticks[-1], top, bottom)
            detail = f"{s.name} {fmt(value)}"
            bars.append(Bar(x=round(left + i * slot + slot * 0.1, 2), y=round(y_top, 2),
                            width=round(max(slot * 0.8, 1.0), 2), height=round(y_base - y_top, 2),
                            css=s.css, title=f"{label}: {detail}", ts=stamps[i] if stamps else None,
                            detail=detail))
            base += value
    return Chart(width=width, height=height, left=left, top=top, right=right, bottom=bottom, bars=tuple(bars),
                 y_ticks=_y_ticks(ticks, top, bottom, fmt),
                 x_ticks=_x_ticks(labels, left, slot, most_x_labels, stamps),
                 y_label=y_label, x_label=x_label, legend=tuple((s.css, s.name) for s in series))


def _line(css: str, label: str, values: Sequence[float | None], top_value: float, left: float, slot: float,
          top: float, bottom: float) -> Line:
    """A series of values (None: no value, which breaks the line) at the middles of the slots."""
    segments: list[tuple[tuple[float, float], ...]] = []
    current: list[tuple[float, float]] = []
    for i, value in enumerate(values):
        if value is None:
            if current:
                segments.append(tuple(current))
            current = []
            continue
        current.append((round(left + (i + 0.5) * slot, 2), round(_scale(value, top_value, top, bottom), 2)))
    if current:
        segments.append(tuple(current))
    return Line(css=css, label=label, segments=tuple(segments))


def _hour_label(start: float) -> str:
    return dt.datetime.fromtimestamp(start, dt.timezone.utc).strftime("%H:%M")


def runs_chart(buckets: Sequence[dict[str, Any]], *, width: int = 640, height: int = 220) -> Chart:
    """A workflow's runs per bucket (workflow_stats' ``buckets``) as bars, errors stacked on the successes in
    their own colour, with the p50 and p95 latency as lines against a second axis on the right (ms).

    The hours are labelled in UTC, each tick and bar carrying its bucket's start, so console.js can relabel
    them in the viewer's zone (the UTC text stays for a browser without script)."""
    labels = [_hour_label(b["start"]) for b in buckets]
    errors = [b.get("errors") or 0 for b in buckets]
    ok = [max((b.get("runs") or 0) - e, 0) for b, e in zip(buckets, errors)]
    chart = bar_chart(labels, [Series("bar-ok", "succeeded", ok), Series("bar-error", "errors", errors)],
                      width=width, height=height, y_label="runs per hour", x_label="hour (UTC)", most_x_labels=6,
                      integer=True, margins=(44, 12, 56, 28), stamps=[float(b["start"]) for b in buckets])
    chart = replace(chart, x_label_local="hour (your time)")
    p50 = [b.get("p50_ms") for b in buckets]
    p95 = [b.get("p95_ms") for b in buckets]
    latencies = [v for v in p50 + p95 if v is not None]
    ticks = nice_ticks(max(latencies, default=0))
    slot = (chart.right - chart.left) / len(buckets) if buckets else 0.0
    lines = tuple(_line(css, label, values, ticks[-1], chart.left, slot, chart.top, chart.bottom)
                  for css, label, values in (("line-p50", "p50 latency", p50), ("line-p95", "p95 latency", p95)))
    return replace(chart, lines=lines, y2_label="latency",
                   y2_ticks=_y_ticks(ticks, chart.top, chart.bottom, duration_text),
                   legend=chart.legend + tuple((line.css, line.label) for line in lines))


@dataclass(frozen=True)
class Sparkline:
    """A tiny line of values with no axes: its size, its points and the largest value (for its label)."""

    width: int
    height: int
    points: str
    maximum: float


def sparkline(values: Sequence[float], width: int = 96, height: int = 24, pad: float = 2.0) -> Sparkline:
    """``values`` as the ``points`` of a <polyline> spanning the box; all zeros lie on the bottom edge."""
    maximum = max(values, default=0)
    n = len(values)
    step = (width - 2 * pad) / (n - 1) if n > 1 else 0.0
    span = height - 2 * pad
    points = []
    for i, value in enumerate(values):
        x = pad + i * step if n > 1 else width / 2
        y = height - pad - (value / maximum * span if maximum > 0 else 0)
        points.append(f"{x:.1f},{y:.1f}")
    return Sparkline(width=width, height=height, points=" ".join(points), maximum=maximum)


def stats_summary(stats: dict[str, Any]) -> str:
    """workflow_stats as one sentence: "12 runs, 2 errors (16.7%), p50 850 ms, p95 2.4 s".

    The error rate is of the runs that ended; while some have not, the sentence says so: "12 runs (2 not ended
    yet), 2 errors (20.0% of the 10 ended)", and with none ended it names no errors at all.
    """
    runs, errors = stats.get("runs") or 0, stats.get("errors") or 0
    hours = stats.get("hours", 24)
    if not runs:
        return f"No runs in the last {hours} hours"
    ended = stats.get("ended", runs)
    going = runs - ended
    text = f"{runs} run{'s' if runs != 1 else ''}" + (f" ({going} not ended yet)" if going else "")
    rate = stats.get("error_rate")
    if rate is None:  # none ended: no outcome, no latency yet
        return text
    text += (f", {errors} error{'s' if errors != 1 else ''} ({rate * 100:.1f}%"
             + (f" of the {ended} ended)" if going else ")"))
    if stats.get("p50_ms") is not None:
        text += f", p50 {duration_text(stats['p50_ms'])}, p95 {duration_text(stats.get('p95_ms'))}"
    return text
