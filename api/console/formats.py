"""How the console writes numbers and durations, in one place for its pages, charts and timelines; no Flask.

Durations read as people write them ("850 ms", "2.4 s", "2 s", "1 m 3 s", "1 m", "2 h 5 m"): a timeline row's
label and its tooltip, a chart's axis and a table's cell all say the same of the same duration.
"""
from __future__ import annotations

__all__ = ["duration_text", "format_number", "seconds_text"]

NONE = "—"  # what a missing value shows as


def duration_text(ms: float | None) -> str:
    """Milliseconds as people read them: "850 ms", "2.4 s", "2 s", "1 m 3 s", "1 m", "2 h 5 m"; "—" for none."""
    if ms is None:
        return NONE
    ms = float(ms)
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 1 or ms == 0 else f"{ms:.2f} ms"
    if ms < 60_000:
        return _trim(f"{ms / 1000:.1f}") + " s"
    seconds = int(round(ms / 1000))
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes} m {rest} s" if rest else f"{minutes} m"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours} h {minutes} m" if minutes else f"{hours} h"


def seconds_text(seconds: float | None) -> str:
    """A setting in seconds as it was set, whole seconds without a fraction: "60 s", "1.5 s"; "—" for none."""
    if seconds is None:
        return NONE
    return _trim(f"{float(seconds):.3f}") + " s"


def format_number(value: float) -> str:
    """A short label: 950, 1.2k, 3M; fractions with at most two significant digits after the point."""
    magnitude = abs(value)
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= size:
            return _trim(f"{value / size:.1f}") + suffix
    if value == int(value):
        return str(int(value))
    return f"{value:.2g}" if magnitude < 1 else _trim(f"{value:.1f}")


def _trim(text: str) -> str:
    """A decimal without its trailing zeros, nor its point when nothing follows it: "2.0" -> "2", "1.50" -> "1.5"."""
    return text.rstrip("0").rstrip(".") if "." in text else text
