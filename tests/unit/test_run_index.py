"""Listing runs through their indexes (RunStore.list_runs) against a real Redis: cursors, ties, summaries."""
from __future__ import annotations

from typing import Any

import redis

from flowpool.run import RunRecord, RunStatus
from flowpool.runs import RunStore

ACCOUNT = "acct-1"


def _store(redis_db: redis.Redis) -> RunStore:
    return RunStore(redis_db, ttl_seconds=600, runs_per_workflow=100)


def _record(store: RunStore, request_id: str, queued_at: float, status: RunStatus = RunStatus.SUCCEEDED,
            **fields: Any) -> None:
    store.record(RunRecord(request_id=request_id, account=ACCOUNT, workflow="w", status=status,
                           queued_at=queued_at, finished_at=queued_at + 1, **fields))


def _pages(store: RunStore, **params: Any) -> list[list[str]]:
    """Every page of a listing, following its cursor."""
    found: list[list[str]] = []
    until = None
    for _ in range(50):
        records, until = store.list_runs(ACCOUNT, until=until, **params)
        found.append([r.request_id for r in records])
        if until is None:
            return found
    raise AssertionError(f"no last page: {found}")


class _QueuedMeanwhile(RunStore):
    """A store under which a run is queued after the first batch of a listing was read."""

    list_batch = 8  # a filtered listing reads 8 ids a batch (4 times a limit of 2), not 200
    queued = False

    def _fields(self, request_ids: list[str], names: tuple[str, ...]) -> list[dict[str, Any] | None]:
        found = super()._fields(request_ids, names)
        if not self.queued:
            self.queued = True
            _record(self, "req-new", 2000.0, RunStatus.FAILED)
        return found


def test_a_run_queued_between_two_batches_makes_no_run_be_listed_twice(redis_db: redis.Redis) -> None:
    store = _QueuedMeanwhile(redis_db, ttl_seconds=600, runs_per_workflow=100)
    failed = {1, 5, 12}  # r12 is the last of the first batch of 8 ids
    for i in range(20):
        _record(store, f"r{i}", 1000.0 + i, RunStatus.FAILED if i in failed else RunStatus.SUCCEEDED)

    records, until = store.list_runs(ACCOUNT, status={"failed"}, limit=2)

    assert store.queued
    assert [r.request_id for r in records] == ["r12", "r5"]
    rest, _ = store.list_runs(ACCOUNT, status={"failed"}, limit=2, until=until)
    assert [r.request_id for r in rest] == ["r1"]


def test_more_runs_at_one_instant_than_a_page_are_all_on_one_page(redis_db: redis.Redis) -> None:
    store = _store(redis_db)
    tied = [f"t{i}" for i in range(5)]
    for request_id in tied:
        _record(store, request_id, 1000.5)
    _record(store, "older", 999.0)

    pages = _pages(store, limit=2)

    assert [sorted(page) for page in pages] == [tied, ["older"]]


def test_a_filtered_page_of_runs_at_one_instant_reads_past_its_first_batch(redis_db: redis.Redis) -> None:
    store = _store(redis_db)
    for i in range(12):
        _record(store, f"t{i:02}", 1000.5, RunStatus.FAILED if i % 2 else RunStatus.SUCCEEDED)

    store.list_batch = 8
    pages = _pages(store, status={"failed"}, limit=2)  # a first batch of 8 ids: 4 of the 6 failed

    assert [sorted(page) for page in pages] == [[f"t{i:02}" for i in range(1, 12, 2)]]


def test_cursor_pages_list_every_run_once_across_ties_and_filters(redis_db: redis.Redis) -> None:
    store = _store(redis_db)
    times = [1000.0, 1000.0, 999.5, 999.5, 999.5, 999.0, 998.0, 998.0, 997.0]
    for i, queued_at in enumerate(times):
        _record(store, f"r{i}", queued_at, RunStatus.FAILED if i % 3 else RunStatus.SUCCEEDED)

    for limit in (1, 2, 3, 50):
        listed = sum(_pages(store, limit=limit), [])
        assert sorted(listed) == sorted(f"r{i}" for i in range(len(times))), limit
        failed = sum(_pages(store, limit=limit, status={"failed"}), [])
        assert sorted(failed) == sorted(f"r{i}" for i in range(len(times)) if i % 3), limit


def test_a_listing_reads_only_the_summary_fields_and_shows_the_same_summary(redis_db: redis.Redis) -> None:
    store = _store(redis_db)
    _record(store, "big", 1000.0, version="1.0.0", session_id="sess-1", cache_hit=False, worker="worker-a",
            started_at=1000.25, output={"text": "x" * 100_000}, input={"q": "question"},
            messages=[{"role": "user", "content": "hi"}], logs=[{"message": "a line"}],
            http_calls=[{"kind": "http", "path": "/x"}], error={"type": "none", "message": "kept in summaries"})
    full = store.get("big")
    assert full is not None and full.output is not None

    [summary] = store.get_summaries(["big"])
    records, _ = store.list_runs(ACCOUNT)

    assert summary is not None
    assert (summary.output, summary.input, summary.messages, summary.logs, summary.http_calls) == (
        None, None, None, None, None)
    assert summary.to_view(full=False) == full.to_view(full=False)
    assert [r.to_view(full=False) for r in records] == [full.to_view(full=False)]
    assert records[0].output is None and records[0].logs is None
    assert store.get_summaries(["gone"]) == [None]
