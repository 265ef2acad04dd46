"""The console's chart geometry (api/console/charts.py) and its one-sentence summary of a workflow's stats."""
from __future__ import annotations

import pytest

from flowpool.api.console import charts
from flowpool.api.console.charts import Series, bar_chart, nice_ticks, runs_chart, sparkline, stats_summary


@pytest.mark.parametrize("maximum, ticks", [
    (10, [0, 5, 10]),
    (7, [0, 2, 4, 6, 8]),
    (1, [0, 0.5, 1]),
    (0.3, [0, 0.1, 0.2, 0.3]),
    (95, [0, 50, 100]),
    (1234, [0, 500, 1000, 1500]),
    (2400, [0, 1000, 2000, 3000]),
])
def test_nice_ticks_run_from_zero_to_a_round_number_at_or_above_the_maximum(maximum: float,
                                                                           ticks: list[float]) -> None:
    assert nice_ticks(maximum) == ticks


def test_integer_ticks_never_step_by_a_fraction() -> None:
    assert nice_ticks(2, integer=True) == [0, 1, 2]
    assert nice_ticks(2) == [0, 0.5, 1, 1.5, 2]


@pytest.mark.parametrize("maximum", [0, -3, float("nan"), float("inf")])
def test_nice_ticks_of_nothing_span_zero_to_one(maximum: float) -> None:
    assert nice_ticks(maximum) == [0, 1]


def test_nice_step_picks_one_two_or_five_times_a_power_of_ten() -> None:
    assert [charts.nice_step(x) for x in (0.7, 1, 1.5, 3, 7, 12, 450)] == [1, 1, 2, 5, 10, 20, 500]


def test_bars_scale_to_the_top_tick_and_stack_series_in_order() -> None:
    chart = bar_chart(["a", "b"], [Series("ok", "ok", [10, 4]), Series("err", "errors", [0, 6])],
                      width=200, height=120, margins=(20, 10, 20, 10))
    # Plot area: x 20..180, y 10..110; top tick 10 -> 100 px per 10 units.
    assert [t.label for t in chart.y_ticks] == ["0", "5", "10"]
    assert chart.y_ticks[0].pos == 110 and chart.y_ticks[-1].pos == 10
    a_ok, b_ok, b_err = chart.bars  # a zero value draws no bar
    assert (a_ok.css, a_ok.x, a_ok.width, a_ok.y, a_ok.height) == ("ok", 28, 64, 10, 100)
    assert (b_ok.y, b_ok.height) == (70, 40)
    assert (b_err.css, b_err.y, b_err.height) == ("err", 10, 60)  # on top of b's 4
    assert b_err.title == "b: errors 6"
    assert [t.label for t in chart.x_ticks] == ["a", "b"] and chart.x_ticks[0].pos == 60
    assert chart.legend == (("ok", "ok"), ("err", "errors"))


def test_a_chart_of_zeros_draws_no_bars_and_keeps_an_axis() -> None:
    chart = bar_chart(["a", "b", "c"], [Series("ok", "runs", [0, 0, 0])])
    assert chart.bars == ()
    assert [t.label for t in chart.y_ticks] == ["0", "1"]


def test_a_chart_of_no_slots_has_no_bars_nor_x_labels() -> None:
    chart = bar_chart([], [Series("ok", "runs", [])])
    assert chart.bars == () and chart.x_ticks == ()


def test_one_slot_fills_the_plot_width() -> None:
    chart = bar_chart(["only"], [Series("ok", "runs", [3])], width=100, height=100, margins=(0, 0, 0, 0))
    (bar,) = chart.bars
    assert (bar.x, bar.width) == (10, 80)
    assert (bar.y, bar.height) == (0, 100)  # ticks 0, 1, 2, 3: the top tick is the value


def test_x_labels_are_thinned_to_at_most_the_number_asked() -> None:
    labels = [f"{d:02d}" for d in range(1, 31)]
    chart = bar_chart(labels, [Series("ok", "runs", [1] * 30)], most_x_labels=8)
    assert [t.label for t in chart.x_ticks] == ["01", "05", "09", "13", "17", "21", "25", "29"]


def _bucket(start: float, runs: int, errors: int, p50: float | None, p95: float | None) -> dict:
    return {"start": start, "runs": runs, "errors": errors, "p50_ms": p50, "p95_ms": p95}


def test_runs_chart_stacks_errors_over_successes_and_breaks_latency_lines_at_empty_hours() -> None:
    buckets = [_bucket(0, 4, 1, 800, 2400), _bucket(3600, 0, 0, None, None), _bucket(7200, 2, 0, 500, 900),
               _bucket(10800, 1, 1, 300, 300)]
    chart = runs_chart(buckets)
    assert [(b.css, b.title) for b in chart.bars] == [
        ("bar-ok", "00:00: succeeded 3"), ("bar-error", "00:00: errors 1"), ("bar-ok", "02:00: succeeded 2"),
        ("bar-error", "03:00: errors 1")]
    assert [t.label for t in chart.y_ticks] == ["0", "1", "2", "3", "4"]  # runs are counted in whole numbers
    p50, p95 = chart.lines
    assert (p50.css, p95.css) == ("line-p50", "line-p95")
    assert len(p50.segments) == 2 and [len(s) for s in p50.segments] == [1, 2]
    # The latency axis is its own: 2400 ms is under its top tick of 3 s, drawn on the right.
    assert [t.label for t in chart.y2_ticks] == ["0 ms", "1 s", "2 s", "3 s"]
    assert p95.segments[0][0][1] == pytest.approx(chart.bottom - 0.8 * (chart.bottom - chart.top))
    assert p50.polylines[1].count(",") == 2
    assert ("line-p95", "p95 latency") in chart.legend


def test_runs_chart_hours_carry_their_moment_for_the_viewers_zone() -> None:
    buckets = [_bucket(1_700_000_000 + h * 3600, 1, 0, 100, 100) for h in range(24)]
    chart = runs_chart(buckets)
    # The label is UTC text (what a page without script shows); ts is the bucket's start, to show it locally.
    assert [(t.label, t.ts) for t in chart.x_ticks[:2]] == [("22:13", 1_700_000_000.0), ("02:13", 1_700_014_400.0)]
    assert [b.ts for b in chart.bars] == [float(b["start"]) for b in buckets]
    assert chart.bars[0].title == "22:13: succeeded 1" and chart.bars[0].detail == "succeeded 1"
    assert (chart.x_label, chart.x_label_local) == ("hour (UTC)", "hour (your time)")


def test_a_bar_chart_of_labels_alone_carries_no_moments() -> None:
    chart = bar_chart(["05-01", "05-02"], [Series("bar-ok", "runs", [1, 2])], x_label="UTC day")
    assert all(t.ts is None for t in chart.x_ticks) and all(b.ts is None for b in chart.bars)
    assert chart.x_label_local == ""


def test_runs_chart_of_a_quiet_day_draws_no_bars_nor_lines() -> None:
    chart = runs_chart([_bucket(h * 3600, 0, 0, None, None) for h in range(24)])
    assert chart.bars == () and all(line.segments == () for line in chart.lines)
    assert len(chart.x_ticks) == 6


def test_sparkline_spans_its_box_and_puts_zeros_on_the_bottom_edge() -> None:
    line = sparkline([0, 5, 10], width=100, height=20, pad=0)
    assert line.points == "0.0,20.0 50.0,10.0 100.0,0.0" and line.maximum == 10
    assert sparkline([0, 0], width=10, height=10, pad=0).points == "0.0,10.0 10.0,10.0"
    assert sparkline([7], width=10, height=10, pad=0).points == "5.0,0.0"
    assert sparkline([]).points == ""


def test_stats_summary_says_runs_errors_and_latency_in_one_sentence() -> None:
    stats = {"hours": 24, "runs": 12, "errors": 2, "error_rate": 2 / 12, "p50_ms": 850, "p95_ms": 2400}
    assert stats_summary(stats) == "12 runs, 2 errors (16.7%), p50 850 ms, p95 2.4 s"
    assert stats_summary({**stats, "runs": 1, "errors": 1, "error_rate": 1.0, "p50_ms": None}) == \
        "1 run, 1 error (100.0%)"
    assert stats_summary({"hours": 24, "runs": 0, "errors": 0, "error_rate": None}) == "No runs in the last 24 hours"


def test_stats_summary_gives_the_error_rate_of_the_ended_runs_and_says_how_many_have_not_ended() -> None:
    stats = {"hours": 24, "runs": 10, "ended": 1, "errors": 1, "error_rate": 1.0, "p50_ms": 850, "p95_ms": 850}
    assert stats_summary(stats) == "10 runs (9 not ended yet), 1 error (100.0% of the 1 ended), p50 850 ms, p95 850 ms"
    assert stats_summary({"hours": 24, "runs": 3, "ended": 0, "errors": 0, "error_rate": None, "p50_ms": None}) == \
        "3 runs (3 not ended yet)"
