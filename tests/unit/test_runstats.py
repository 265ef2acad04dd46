"""The math of a workflow's run stats (flowpool.runstats): counts, errors, nearest-rank latency, hourly buckets."""
from __future__ import annotations

import pytest

from flowpool.run import RunRecord, RunStatus
from flowpool.runstats import percentile, workflow_stats

NOW = 1_700_000_000.0
HOUR = 3600


def _run(queued_ago: float, status: RunStatus = RunStatus.SUCCEEDED, took: float | None = 1.0,
         name: str = "r") -> RunRecord:
    """A run queued ``queued_ago`` seconds before NOW that (unless ``took`` is None) finished ``took`` s later."""
    queued_at = NOW - queued_ago
    return RunRecord(request_id=f"req_{name}_{queued_ago}", account="acct", workflow="wf", status=status.value,
                     queued_at=queued_at, finished_at=None if took is None else queued_at + took)


def test_no_runs_give_zero_counts_null_rates_and_every_bucket_empty() -> None:
    stats = workflow_stats([], NOW)

    assert stats["hours"] == 24 and stats["runs"] == 0 and stats["errors"] == 0
    assert stats["error_rate"] is None and stats["p50_ms"] is None and stats["p95_ms"] is None
    assert stats["sampled"] is False
    assert len(stats["buckets"]) == 24
    assert all(b["runs"] == 0 and b["p50_ms"] is None for b in stats["buckets"])
    assert [b["start"] for b in stats["buckets"]] == [NOW - 24 * HOUR + i * HOUR for i in range(24)]


def test_one_run_is_its_own_p50_and_p95_and_lands_in_its_hour() -> None:
    stats = workflow_stats([_run(90 * 60, took=0.25)], NOW)

    assert stats["runs"] == 1 and stats["errors"] == 0 and stats["error_rate"] == 0
    assert stats["p50_ms"] == 250.0 and stats["p95_ms"] == 250.0
    # 90 minutes ago is in the second-to-last hour of the window, oldest first.
    assert [b["runs"] for b in stats["buckets"]] == [0] * 22 + [1, 0]
    assert stats["buckets"][22]["p95_ms"] == 250.0


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2  # rank ceil(0.5 * 4) = 2
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile(list(range(1, 21)), 95) == 19
    assert percentile([7], 95) == 7

    runs = [_run(60 + i, took=float(i + 1), name=str(i)) for i in range(20)]  # 1 s .. 20 s
    stats = workflow_stats(runs, NOW)

    assert stats["p50_ms"] == 10_000.0 and stats["p95_ms"] == 19_000.0


def test_every_ended_status_but_succeeded_is_an_error() -> None:
    ended = [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.LOST, RunStatus.EXPIRED,
             RunStatus.CANCELLED]
    runs = [_run(100 + i, status, name=status.value) for i, status in enumerate(ended)]

    stats = workflow_stats(runs, NOW)

    assert stats["runs"] == 6 and stats["errors"] == 5
    assert stats["error_rate"] == pytest.approx(5 / 6)


def test_queued_and_running_runs_count_as_runs_but_not_in_latency_or_errors() -> None:
    runs = [_run(10, took=2.0), _run(20, RunStatus.RUNNING, took=None), _run(30, RunStatus.QUEUED, took=None),
            _run(40, RunStatus.RUNNING, took=500.0)]  # a finished_at on a running run is not its latency

    stats = workflow_stats(runs, NOW)

    assert stats["runs"] == 4 and stats["errors"] == 0 and stats["error_rate"] == 0
    assert stats["p50_ms"] == 2000.0 and stats["p95_ms"] == 2000.0


def test_the_error_rate_is_of_the_runs_that_ended_and_none_while_none_has() -> None:
    failed = _run(10, RunStatus.FAILED, name="failed")
    running = [_run(20 + i, RunStatus.RUNNING, took=None, name=str(i)) for i in range(9)]

    stats = workflow_stats([failed, *running], NOW)

    assert stats["runs"] == 10 and stats["ended"] == 1 and stats["errors"] == 1
    assert stats["error_rate"] == 1.0  # 1 of the 1 run that ended, not 1 of 10
    assert stats["buckets"][-1]["ended"] == 1
    assert workflow_stats(running, NOW)["error_rate"] is None


def test_buckets_split_the_window_and_add_up_to_the_totals() -> None:
    runs = [_run(30, took=1.0), _run(40, RunStatus.FAILED, took=3.0), _run(2 * HOUR + 5, took=5.0),
            _run(6 * HOUR - 1, took=7.0)]
    older = _run(6 * HOUR + 1, took=9.0)  # before the window
    later = RunRecord(request_id="req_later", account="acct", workflow="wf", status="succeeded",
                      queued_at=NOW + 2, finished_at=NOW + 3)  # another process's clock a little ahead

    stats = workflow_stats(runs + [older, later], NOW, hours=6, bucket_seconds=1800)

    assert len(stats["buckets"]) == 12
    assert [b["runs"] for b in stats["buckets"]] == [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3]
    assert sum(b["runs"] for b in stats["buckets"]) == stats["runs"] == 5
    assert sum(b["errors"] for b in stats["buckets"]) == stats["errors"] == 1
    last = stats["buckets"][-1]
    assert last["start"] == NOW - 1800 and last["p50_ms"] == 1000.0 and last["p95_ms"] == 3000.0
    assert stats["buckets"][0]["p50_ms"] == 7000.0


def test_sampled_is_passed_through_and_a_window_not_split_evenly_is_refused() -> None:
    assert workflow_stats([_run(5)], NOW, sampled=True)["sampled"] is True
    with pytest.raises(ValueError):
        workflow_stats([], NOW, hours=1, bucket_seconds=7 * 60)
    with pytest.raises(ValueError):
        workflow_stats([], NOW, hours=0)
