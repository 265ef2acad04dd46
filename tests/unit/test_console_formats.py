"""How the console writes durations and numbers (api/console/formats.py): one way for every page, chart and
timeline."""
from __future__ import annotations

import pytest

from flowpool.api.console.charts import stats_summary
from flowpool.api.console.formats import duration_text, format_number, seconds_text
from flowpool.api.console.timeline import build
from flowpool.run import RunRecord


@pytest.mark.parametrize(("ms", "text"), [
    (None, "—"), (0, "0 ms"), (0.25, "0.25 ms"), (850, "850 ms"), (999.4, "999 ms"), (2000, "2 s"),
    (2400, "2.4 s"), (59_940, "59.9 s"), (60_000, "1 m"), (63_000, "1 m 3 s"), (3_600_000, "1 h"),
    (3_723_000, "1 h 2 m"), (7_500_000, "2 h 5 m"),
])
def test_durations_read_as_people_write_them(ms: float | None, text: str) -> None:
    assert duration_text(ms) == text


@pytest.mark.parametrize(("seconds", "text"), [(None, "—"), (60.0, "60 s"), (1.5, "1.5 s"), (600, "600 s")])
def test_a_setting_in_seconds_reads_as_it_was_set(seconds: float | None, text: str) -> None:
    assert seconds_text(seconds) == text


@pytest.mark.parametrize(("value", "text"), [(0, "0"), (950, "950"), (1200, "1.2k"), (3_000_000, "3M"),
                                             (0.25, "0.25"), (2.5, "2.5")])
def test_numbers_are_labelled_short(value: float, text: str) -> None:
    assert format_number(value) == text


def test_a_timeline_row_and_a_stats_summary_write_a_duration_as_the_pages_do() -> None:
    t0 = 1_700_000_000.0
    record = RunRecord(request_id="req_1", account="acct", workflow="flow", status="succeeded", version="1.0.0",
                       queued_at=t0, started_at=t0 + 2, finished_at=t0 + 62,
                       model_calls=[{"kind": "model", "model": "m", "status": "ok", "started_at": t0 + 2,
                                     "latency_ms": 2000.0}])
    run, call = build([record], now=t0 + 100).rows
    assert run.title == "run flow@1.0.0: succeeded, 1 m 2 s (queued 2 s)"
    assert call.title.split(" · ")[2] == duration_text(call.duration_ms) == "2 s"
    assert stats_summary({"runs": 1, "errors": 0, "error_rate": 0.0, "p50_ms": 60_000, "p95_ms": 2000}) == \
        "1 run, 0 errors (0.0%), p50 1 m, p95 2 s"
