"""Runs read back through their indexes: the account's, a workflow's, a session's (all zsets scored by queue time).

An index may hold ids whose record has expired (records live ``FLOWPOOL_RUN_TTL_SECONDS``; the indexes are trimmed
by count): those are passed over as they are read. :class:`RunIndex` is the reading half of
:class:`~flowpool.runs.RunStore`, which writes the indexes (``run_scripts`` BEGIN, :meth:`RunStore.create`). It also
reads a running run's calls so far (:mod:`flowpool.live_calls`), which its record gets only with its end.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Collection

from flowpool import keys, live_calls
from flowpool.run import RunRecord
from flowpool.runstats import workflow_stats

if TYPE_CHECKING:
    import redis

__all__ = ["SCAN_LIMIT", "SUMMARY_FIELDS", "RunIndex"]

# The most ids one listing looks at: a filter that matches little answers with a cursor to go on from, not a scan of
# the whole index.
SCAN_LIMIT = 2000
# What a listing reads of each id it looks at to filter it: the whole record is read only for those it answers.
_FILTER_FIELDS = ("status", "account", "workflow")
# What the stats read of each run.
_STATS_FIELDS = ("status", "account", "workflow", "queued_at", "finished_at")
# What a listing reads of each run it answers: the fields of its summary (RunRecord.to_view(full=False)).
SUMMARY_FIELDS = ("request_id", "account", "workflow", "status", "version", "session_id", "cache_hit", "queued_at",
                  "started_at", "finished_at", "worker", "error")


class RunIndex:
    """List runs by their indexes, and sum up a workflow's recent ones."""

    redis: redis.Redis
    runs_per_workflow: int
    # The fewest ids a filtered listing reads per round trip (most may not match).
    list_batch = 200

    def list_for_session(self, account_id: str, session_id: str, offset: int, limit: int) -> tuple[list[str], int]:
        """Request ids of a session's runs, oldest first, and the total."""
        index = keys.session_runs(account_id, session_id)
        return [i.decode() for i in self.redis.zrange(index, offset, offset + limit - 1)], self.redis.zcard(index)

    def list_for_workflow(self, account_id: str, ref: str, offset: int, limit: int) -> tuple[list[str], int]:
        """Request ids of a workflow's runs, newest first, and the total."""
        index = keys.workflow_runs(account_id, ref)
        total = self.redis.zcard(index)
        ids = [i.decode() for i in self.redis.zrevrange(index, offset, offset + limit - 1)]
        return ids, total

    def list_runs(self, account_id: str, *, workflow: str | None = None, status: Collection[str] | None = None,
                  session_id: str | None = None, since: float | None = None, until: float | None = None,
                  limit: int = 50) -> tuple[list[RunRecord], float | None]:
        """The account's runs, newest first, queued from ``since`` (inclusive) to ``until`` (exclusive), as
        summaries (:meth:`get_summaries`), and the ``until`` of the next page (None when there is none).

        Read from the session's index with ``session_id`` (``workflow`` then filters), else the workflow's with
        ``workflow``, else the account's. At most :data:`SCAN_LIMIT` ids are looked at per call: a ``status``
        that matches few runs may answer fewer than ``limit`` with a cursor to go on from. A page ends between
        two queue times, so runs queued at one instant are never split between pages: when more than ``limit``
        of them are at the page's end, the page holds all of them (so more than ``limit``), up to another
        :data:`SCAN_LIMIT` looked at; only the runs past that of thousands queued at the very same instant are
        never listed.
        """
        if session_id:
            index = keys.session_runs(account_id, session_id)
        elif workflow:
            index = keys.workflow_runs(account_id, workflow)
        else:
            index = keys.account_runs(account_id)
        wanted = set(status) if status else None
        filtered = wanted is not None or bool(session_id and workflow)  # ids looked at may not be listed
        reader = _Reader(self.redis, index, f"({until!r}" if until is not None else "+inf",
                         repr(since) if since is not None else "-inf")
        scanned: list[tuple[str, float]] = []
        matched: list[tuple[str, float]] = []

        def read(size: int) -> list[tuple[str, float]]:
            batch = reader.read(size)
            scanned.extend(batch)
            matched.extend(entry for entry, fields in zip(batch, self._fields([i for i, _ in batch], _FILTER_FIELDS))
                           if _matches(fields, account_id, workflow, wanted))
            return batch

        while len(matched) <= limit and len(scanned) < SCAN_LIMIT and not reader.done:
            # Unfiltered, the page's ids and the one after it; filtered, more at once (most may not match).
            read(min(SCAN_LIMIT - len(scanned),
                     max(4 * limit, self.list_batch) if filtered else limit + 1 - len(matched)))
        if len(matched) <= limit and reader.done:
            page, next_until = matched, None
        else:
            # Cut where the queue time changes: the next page (until is exclusive) starts with every run at or
            # below ``boundary``, looked at or not.
            boundary = matched[limit][1] if len(matched) > limit else scanned[-1][1]
            above = [score for _, score in scanned if score > boundary]
            if above:
                page, next_until = [m for m in matched if m[1] > boundary], min(above)
            else:  # more than a page of runs queued at one instant: the page is all of them, read to their end
                looked_at = len(scanned)
                while scanned[-1][1] == boundary and not reader.done and len(scanned) - looked_at < SCAN_LIMIT:
                    read(min(SCAN_LIMIT - (len(scanned) - looked_at), max(4 * limit, self.list_batch)))
                page, next_until = [m for m in matched if m[1] == boundary], boundary
                if reader.done and scanned[-1][1] == boundary:
                    next_until = None  # nothing below them
        records = self.get_summaries([request_id for request_id, _ in page])
        return [r for r in records if r is not None and r.account == account_id], next_until

    def get_summaries(self, request_ids: list[str]) -> list[RunRecord | None]:
        """Several records in one round trip with only the fields of their summary (``to_view(full=False)``), never
        their input, output, logs or calls, which may be megabytes each; None for a record gone."""
        pipe = self.redis.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hmget(keys.run(request_id), *SUMMARY_FIELDS)
        return [RunRecord.from_fields({name.encode(): raw for name, raw in zip(SUMMARY_FIELDS, values)
                                       if raw is not None})
                for values in pipe.execute()]

    def with_live_calls(self, record: RunRecord) -> RunRecord:
        """``record`` with its calls so far while it runs (:func:`flowpool.live_calls.with_live_calls`)."""
        return live_calls.with_live_calls(self.redis, record)

    def workflow_stats(self, account_id: str, ref: str, now: float, hours: int = 24) -> dict[str, Any]:
        """The workflow's runs of the ``hours`` up to ``now`` summed up (:func:`flowpool.runstats.workflow_stats`).

        At most ``runs_per_workflow`` runs are read, the newest; ``sampled`` says the window held more, read or
        dropped from the index already (it keeps that many).
        """
        return self.workflows_stats(account_id, [ref], now, hours)[0]

    def workflows_stats(self, account_id: str, refs: list[str], now: float, hours: int = 24) -> list[dict[str, Any]]:
        """:meth:`workflow_stats` of each of ``refs``, in order, in two round trips for them all."""
        start = now - hours * 3600
        cap = self.runs_per_workflow
        pipe = self.redis.pipeline(transaction=False)
        for ref in refs:
            index = keys.workflow_runs(account_id, ref)
            # Up to +inf: a run queued a moment after ``now`` by another process's clock counts in the last bucket.
            pipe.zrevrangebyscore(index, "+inf", repr(start), start=0, num=cap + 1)
            pipe.zcard(index)
            pipe.zrange(index, 0, 0, withscores=True)
        replies = pipe.execute()
        per_ref = [replies[i:i + 3] for i in range(0, len(replies), 3)]
        ids = [[member.decode() for member in members[:cap]] for members, _, _ in per_ref]
        fields = iter(self._fields([request_id for some in ids for request_id in some], _STATS_FIELDS))
        stats = []
        for ref, (members, total, oldest), some in zip(refs, per_ref, ids):
            # The index is trimmed to runs_per_workflow: when full, runs older than its oldest may be in the window.
            dropped = total >= cap and bool(oldest) and oldest[0][1] > start
            records = []
            for request_id, found in zip(some, fields):
                if found is None or found["account"] != account_id or found["workflow"] != ref:
                    continue
                records.append(RunRecord(request_id=request_id, account=account_id, workflow=ref,
                                         status=found["status"], queued_at=found["queued_at"],
                                         finished_at=found["finished_at"]))
            stats.append(workflow_stats(records, now, hours, sampled=len(members) > cap or dropped))
        return stats

    def _fields(self, request_ids: list[str], names: tuple[str, ...]) -> list[dict[str, Any] | None]:
        """Some fields of several records in one round trip, decoded (the status as-is); None for a record gone."""
        pipe = self.redis.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hmget(keys.run(request_id), *names)
        found: list[dict[str, Any] | None] = []
        for values in pipe.execute():
            if values[0] is None:  # no status: no record (expired), or what a worker wrote after it expired
                found.append(None)
                continue
            found.append({name: (raw.decode() if name == "status" else json.loads(raw)) if raw is not None else None
                          for name, raw in zip(names, values)})
        return found


def _matches(fields: dict[str, Any] | None, account_id: str, workflow: str | None, status: set[str] | None) -> bool:
    """Whether a run read with :data:`_FILTER_FIELDS` is one to list."""
    if fields is None or fields["account"] != account_id:
        return False
    if workflow and fields["workflow"] != workflow:
        return False
    return status is None or fields["status"] in status


class _Reader:
    """An index read newest first in batches, each below the last queue time read (not at a position: a run
    queued meanwhile moves every position on, and would make a run be read twice)."""

    def __init__(self, client: redis.Redis, index: str, high: str, low: str) -> None:
        self.redis, self.index, self.high, self.low = client, index, high, low
        self.done = False
        self._tied: set[str] = set()  # the ids read at the lowest queue time read so far

    def read(self, size: int) -> list[tuple[str, float]]:
        """The next ``size`` ids and queue times (fewer at the end of the range: then ``done``)."""
        # From the last queue time read, inclusive (more runs may share it), asking for the ids read there again
        # too and passing over them: counted by id, not position, so one removed meanwhile skips nothing.
        wanted = size + len(self._tied)
        rows = self.redis.zrevrangebyscore(self.index, self.high, self.low, start=0, num=wanted, withscores=True)
        fresh = [(member.decode(), score) for member, score in rows if member.decode() not in self._tied]
        self.done = len(rows) < wanted and len(fresh) <= size
        batch = fresh[:size]
        if batch:
            lowest = batch[-1][1]
            if repr(lowest) != self.high:  # below the last queue time read: the ids read at that one are passed
                self._tied = set()
            self._tied.update(request_id for request_id, score in batch if score == lowest)
            self.high = repr(lowest)
        return batch
