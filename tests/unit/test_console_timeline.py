"""The console's timeline: rows, their order and their bars as fractions of one axis (pure, no I/O)."""
from __future__ import annotations

import re
from typing import Any

import pytest

from flowpool.api.console.timeline import MIN_WIDTH, Row, build, call_anchor, run_anchor
from flowpool.run import RunRecord

T0 = 1_700_000_000.0


def _record(request_id: str = "req_1", **fields: Any) -> RunRecord:
    values: dict[str, Any] = {"account": "acct", "workflow": "flow", "status": "succeeded", "version": "1.0.0",
                              "queued_at": T0, "started_at": T0 + 1, "finished_at": T0 + 11}
    values.update(fields)
    return RunRecord(request_id=request_id, **values)


def _extent(row: Row) -> tuple[float, float]:
    """Where a row's bars start and how far they reach, as fractions of the axis."""
    first, last = row.segments[0], row.segments[-1]
    return first.offset, last.offset + last.width - first.offset


def _model(started: float, latency_ms: float | None, **extra: Any) -> dict[str, Any]:
    return {"kind": "model", "model": "echo", "status": "ok", "fallback": 0, "started_at": started,
            "latency_ms": latency_ms, "ttft_ms": None, "total_tokens": 9, **extra}


def test_a_run_row_shows_its_queue_wait_then_its_run_on_an_axis_from_queued_to_finished() -> None:
    timeline = build([_record()], now=T0 + 100)
    [row] = timeline.rows
    assert row.kind == "run" and row.label == "run flow@1.0.0" and row.anchor == run_anchor("req_1")
    assert (timeline.axis.start, timeline.axis.end) == (T0, T0 + 11)
    queued, ran = row.segments
    assert (queued.phase, queued.offset, queued.width) == ("queued", 0.0, pytest.approx(1 / 11, abs=1e-6))
    assert (ran.phase, ran.offset, ran.width) == ("ended", pytest.approx(1 / 11, abs=1e-6),
                                                   pytest.approx(10 / 11, abs=1e-6))
    assert row.duration_ms == pytest.approx(11_000)
    assert "queued 1 s" in row.title and "succeeded" in row.title


def test_calls_are_rows_after_their_run_in_the_order_they_started_at_their_fractions() -> None:
    record = _record(model_calls=[_model(T0 + 6, 2000), _model(T0 + 2, 1000, model="first")],
                     workflow_calls=[{"workflow": "child", "version": "2.0.0", "status": "ok", "started_at": T0 + 4,
                                      "latency_ms": 500}])
    rows = build([record], now=T0 + 100).rows
    assert [r.label for r in rows] == ["run flow@1.0.0", "model first", "workflow child@2.0.0", "model echo"]
    first, child, echo = rows[1:]
    assert _extent(first) == (pytest.approx(2 / 11, abs=1e-6), pytest.approx(1 / 11, abs=1e-6))
    assert _extent(child) == (pytest.approx(4 / 11, abs=1e-6), pytest.approx(0.5 / 11, abs=1e-6))
    assert _extent(echo) == (pytest.approx(6 / 11, abs=1e-6), pytest.approx(2 / 11, abs=1e-6))
    # Each row links to its details row: its list and its place in it, not its place on the timeline.
    assert first.anchor == call_anchor("req_1", "model", 1) and echo.anchor == call_anchor("req_1", "model", 0)
    assert child.anchor == call_anchor("req_1", "workflow", 0)


def test_an_http_call_is_labelled_with_method_host_and_path() -> None:
    call = {"kind": "http", "method": "GET", "host": "127.0.0.1", "port": 8080, "path": "/doc/a", "status": "ok",
            "status_code": 200, "started_at": T0 + 3, "latency_ms": 100.0, "bytes": 12}
    record = _record(http_calls=[call])
    [_, row] = build([record], now=T0 + 100).rows
    assert row.kind == "http" and row.label == "HTTP GET 127.0.0.1:8080/doc/a"
    assert row.anchor == call_anchor("req_1", "http", 0) and row.call["status_code"] == 200


def test_bars_are_clamped_to_the_axis_and_never_narrower_than_the_minimum() -> None:
    record = _record(model_calls=[_model(T0 + 11, 0.0), _model(T0 - 5, 1000), _model(T0 + 3, -50.0)])
    rows = build([record], now=T0 + 100).rows[1:]
    for row in rows:
        offset, width = _extent(row)
        assert 0.0 <= offset and offset + width <= 1.0 + 1e-9
        assert width >= MIN_WIDTH - 1e-9
    instant = next(r for r in rows if r.start == T0 + 11)
    assert _extent(instant) == (pytest.approx(1 - MIN_WIDTH), pytest.approx(MIN_WIDTH))


def test_a_call_outside_the_run_widens_the_axis() -> None:
    record = _record(model_calls=[_model(T0 + 10, 5000)])
    timeline = build([record], now=T0 + 100)
    assert timeline.axis.end == T0 + 15
    assert sum(_extent(timeline.rows[1])) == pytest.approx(1.0)


def test_a_running_run_is_drawn_up_to_now() -> None:
    record = _record(status="running", finished_at=None)
    [row] = build([record], now=T0 + 21).rows
    assert row.running and row.segments[-1].phase == "running"
    assert row.end == T0 + 21 and row.segments[-1].offset + row.segments[-1].width == pytest.approx(1.0)
    assert "so far" in row.title


def test_a_queued_run_is_one_waiting_bar_up_to_now() -> None:
    record = _record(status="queued", started_at=None, finished_at=None)
    [row] = build([record], now=T0 + 4).rows
    assert [s.phase for s in row.segments] == ["queued"] and _extent(row)[1] == pytest.approx(1.0)


def test_a_fallback_call_and_its_first_token_are_marked() -> None:
    record = _record(model_calls=[_model(T0 + 1, 2000, model="fail", status="error", fallback=0, error="HTTP 500"),
                                  _model(T0 + 3, 4000, fallback=1, ttft_ms=1000.0)])
    failed, answered = build([record], now=T0 + 100).rows[1:]
    assert failed.fallback == 0 and failed.status == "error" and "HTTP 500" in failed.title
    assert answered.fallback == 1 and "fallback #1" in answered.title
    assert answered.ttft_ms == 1000.0 and answered.ttft == pytest.approx(4 / 11, abs=1e-6)
    assert failed.ttft is None and answered.tokens == 9


def test_an_agent_call_is_labelled_with_the_agent() -> None:
    record = _record(model_calls=[{"kind": "agent", "agent": "helper", "model": "echo", "status": "ok",
                                   "started_at": T0 + 2, "latency_ms": 10}])
    assert build([record], now=T0 + 100).rows[1].label == "agent helper"


def test_a_call_without_a_start_is_placed_after_the_one_before_it_and_marked_estimated() -> None:
    record = _record(workflow_calls=[{"workflow": "a", "version": "1.0.0", "status": "ok", "latency_ms": 2000},
                                     {"workflow": "b", "version": "1.0.0", "status": "ok", "latency_ms": 3000}])
    a, b = build([record], now=T0 + 100).rows[1:]
    assert a.estimated and b.estimated and "not recorded" in a.title
    assert (a.start, a.end) == (T0 + 1, T0 + 3) and (b.start, b.end) == (T0 + 3, T0 + 6)


def test_several_runs_share_one_axis_oldest_first_each_followed_by_its_calls() -> None:
    later = _record("req_2", queued_at=T0 + 20, started_at=T0 + 20, finished_at=T0 + 40,
                    model_calls=[_model(T0 + 30, 1000)])
    earlier = _record("req_1")
    timeline = build([later, earlier], now=T0 + 100)
    assert [(r.kind, r.request_id) for r in timeline.rows] == [("run", "req_1"), ("run", "req_2"), ("model", "req_2")]
    assert (timeline.axis.start, timeline.axis.end) == (T0, T0 + 40)
    second = timeline.rows[1]
    assert _extent(second) == (pytest.approx(0.5), pytest.approx(0.5))


def test_the_axis_has_round_ticks_from_zero_to_its_end() -> None:
    ticks = build([_record()], now=T0 + 100).axis.ticks
    assert [t.label for t in ticks] == ["0", "+2 s", "+4 s", "+6 s", "+8 s", "+10 s"]
    assert all(0.0 <= t.offset <= 1.0 for t in ticks)
    assert ticks[1].offset == pytest.approx(2 / 11, abs=1e-6)


def test_odd_call_records_do_not_break_the_timeline() -> None:
    record = _record(model_calls=[{"started_at": "soon", "latency_ms": float("nan")}, "not a call"])
    rows = build([record], now=T0 + 100).rows
    assert [r.label for r in rows] == ["run flow@1.0.0", "model ?"] and rows[1].estimated


def test_no_records_give_an_empty_timeline() -> None:
    assert build([], now=T0).rows == ()


def test_a_failed_route_without_a_latency_lasts_until_its_fallback_started() -> None:
    record = _record(model_calls=[_model(T0 + 2, None, model="fail", status="error"),
                                  _model(T0 + 5, 1000, fallback=1)])
    failed, _ = build([record], now=T0 + 100).rows[1:]
    assert (failed.start, failed.end) == (T0 + 2, T0 + 5) and "until the next call" in failed.title


def _http(index: int, started: float) -> dict[str, Any]:
    return {"kind": "http", "method": "GET", "host": "127.0.0.1", "port": 8080, "path": f"/n/{index}",
            "status": "ok", "status_code": 200, "started_at": started, "latency_ms": 10.0, "bytes": 1}


def test_http_calls_over_the_records_cap_are_a_note_row_not_a_bar() -> None:
    omitted = {"kind": "omitted", "status": "omitted", "count": 7,
               "note": "7 more HTTP calls were made and not recorded"}
    record = _record(http_calls=[_http(0, T0 + 2), _http(1, T0 + 3), omitted])
    rows = build([record], now=T0 + 100).rows
    assert [r.kind for r in rows] == ["run", "http", "http", "note"]
    note = rows[-1]
    assert note.label == "7 more HTTP calls not recorded" and note.segments == () and note.start is None
    assert note.anchor == call_anchor("req_1", "http", 2) and "were made and not recorded" in note.title
    assert not any(r.label.startswith("HTTP ?") for r in rows)


def test_a_note_row_is_drawn_as_text_in_the_timeline_and_the_calls_table() -> None:
    from flowpool.api.app import create_app
    from flowpool.settings import Settings

    record = _record(http_calls=[_http(0, T0 + 2), {"kind": "omitted", "count": 1, "note": "1 more, not kept"}])
    timeline = build([record], now=T0 + 100)
    app = create_app(Settings(redis_url="redis://127.0.0.1:9"))
    with app.test_request_context("/console/runs"):
        module = app.jinja_env.get_template("console/_timeline.html").make_module()
        drawn = str(module.timeline_svg(timeline)) + str(module.calls_table(timeline.rows[1:]))
    assert "1 more HTTP call not recorded" in drawn and "1 more, not kept" in drawn
    assert "HTTP ?" not in drawn and drawn.count('class="tl-row tl-note"') == 1
    assert drawn.count('<svg class="tl-bar"') == 2  # the run's and the one call's; the note has no bar


def _luminance(colour: str) -> float:
    """WCAG relative luminance of a #rrggbb colour."""
    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def _contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_every_timeline_colour_has_3_to_1_contrast_with_its_track_and_the_page_light_and_dark() -> None:
    from pathlib import Path

    import flowpool.api.console as console

    css = (Path(console.__file__).parent / "static" / "console.css").read_text()
    found = re.findall(r"--(tl-[a-z]+|bg):\s*(#[0-9a-fA-F]{6});", css)
    # Two sets of each (light, then dark under prefers-color-scheme: dark), in that order in the file.
    schemes: list[dict[str, str]] = [{}, {}]
    for name, colour in found:
        scheme = schemes[0] if name not in schemes[0] else schemes[1]
        scheme[name] = colour
    phases = ("tl-queued", "tl-running", "tl-ended", "tl-failed", "tl-model", "tl-http", "tl-workflow")
    for scheme in schemes:
        assert set(phases) <= set(scheme), scheme
        for phase in phases:
            for ground in ("tl-track", "bg"):
                assert _contrast(scheme[phase], scheme[ground]) >= 3.0, (phase, ground, scheme)
    # Each colour says one thing: no two alike in a scheme.
    assert all(len({scheme[p].lower() for p in phases}) == len(phases) for scheme in schemes)


def test_the_axis_ticks_are_html_text_placed_by_class_the_last_one_aligned_to_the_end() -> None:
    from flowpool.api.app import create_app
    from flowpool.settings import Settings

    timeline = build([_record(finished_at=T0 + 8)], now=T0 + 100)  # 8 s: ticks every second, the last at the end
    app = create_app(Settings(redis_url="redis://127.0.0.1:9"))
    with app.test_request_context("/console/runs"):
        drawn = str(app.jinja_env.get_template("console/_timeline.html").make_module().timeline_svg(timeline))
    ticks = re.findall(r'<span class="tl-tick tl-at-(\d+) tl-tick-(start|mid|end)">([^<]+)</span>', drawn)
    assert ticks[0] == ("0", "start", "0") and ticks[-1] == ("100", "end", "+8 s")
    assert [int(at) for at, _, _ in ticks] == [round(n * 100 / 8) for n in range(9)]
    assert all(align == "mid" for _, align, _ in ticks[1:-1])
    assert "<text" not in drawn and "style=" not in drawn


def _running(**calls: Any) -> RunRecord:
    return RunRecord(request_id="req_1", account="acct", workflow="flow", status="running", version="1.0.0",
                     queued_at=T0, started_at=T0 + 1, **calls)


def test_a_call_still_going_is_a_bar_from_its_start_to_now_marked_running() -> None:
    timeline = build([_running(model_calls=[
        {"kind": "model", "model": "done", "status": "ok", "started_at": T0 + 1, "latency_ms": 1000.0},
        {"kind": "model", "model": "held", "status": "running", "started_at": T0 + 5, "call_id": "2"}])], now=T0 + 10)

    run, done, held = timeline.rows
    assert (timeline.axis.start, timeline.axis.end) == (T0, T0 + 10)
    assert (done.running, done.segments[0].phase) == (False, "call")
    assert held.label == "model held" and held.status == "running" and held.running
    [bar] = held.segments
    assert bar.phase == "call-running"
    assert (bar.offset, bar.width) == (pytest.approx(0.5), pytest.approx(0.5))  # from its start to now
    assert held.duration_ms == pytest.approx(5000) and "in progress" in held.title and "so far" in held.title


def test_a_running_call_is_not_taken_for_a_failed_route_drawn_until_the_next_one() -> None:
    timeline = build([_running(model_calls=[
        {"kind": "model", "model": "a", "status": "running", "started_at": T0 + 2},
        {"kind": "model", "model": "b", "status": "running", "started_at": T0 + 4}])], now=T0 + 6)

    _, first, second = timeline.rows
    assert first.end == T0 + 6 and second.end == T0 + 6
    assert [r.segments[0].phase for r in (first, second)] == ["call-running", "call-running"]
