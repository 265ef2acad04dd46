"""Runs read back through their indexes: the account's, a workflow's, a session's (all zsets scored by queue time).

An index may hold ids whose record has expired (records live ``FLOWPOOL_RUN_TTL_SECONDS``; the indexes are trimmed
by count): those are passed over as they are read. :class:`RunIndex` is the reading half of
:class:`~flowpool.runs.RunStore`, which writes the indexes (``run_scripts`` BEGIN, :meth:`RunStore.create`).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Collection

from flowpool import keys
from flowpool.run import RunRecord
from flowpool.runstats import workflow_stats

if TYPE_CHECKING:
    import redis

__all__ = ["SCAN_LIMIT", "RunIndex"]

# The most ids one listing looks at: a filter that matches little answers with a cursor to go on from, not a scan of
# the whole index.
SCAN_LIMIT = 2000
# What a listing reads of each id it looks at to filter it: the whole record is read only for those it answers.
_FILTER_FIELDS = ("status", "account", "workflow")
# What the stats read of each run.
_STATS_FIELDS = ("status", "account", "workflow", "queued_at", "finished_at")


class RunIndex:
    """List runs by their indexes, and sum up a workflow's recent ones."""

    redis: redis.Redis
    runs_per_workflow: int

    def get_many(self, request_ids: list[str]) -> list[RunRecord | None]:
        """Several records in one round trip (the store's)."""
        raise NotImplementedError

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
        """The account's runs, newest first, queued from ``since`` (inclusive) to ``until`` (exclusive), and the
        ``until`` of the next page (None when there is none).

        Read from the session's index with ``session_id`` (``workflow`` then filters), else the workflow's with
        ``workflow``, else the account's. At most :data:`SCAN_LIMIT` ids are looked at per call: a ``status``
        that matches few runs may answer fewer than ``limit`` with a cursor to go on from. A page ends between
        two queue times, so runs queued at the same instant are never split between pages (unless more than a
        page's worth of them are).
        """
        if session_id:
            index = keys.session_runs(account_id, session_id)
        elif workflow:
            index = keys.workflow_runs(account_id, workflow)
        else:
            index = keys.account_runs(account_id)
        high = f"({until!r}" if until is not None else "+inf"
        low = repr(since) if since is not None else "-inf"
        wanted = set(status) if status else None
        filtered = wanted is not None or bool(session_id and workflow)  # ids looked at may not be listed
        scanned: list[tuple[str, float]] = []
        matched: list[tuple[str, float]] = []
        exhausted = False
        while len(matched) <= limit and len(scanned) < SCAN_LIMIT:
            # Unfiltered, the page's ids and the one after it; filtered, more at once (most may not match).
            size = min(SCAN_LIMIT - len(scanned), max(4 * limit, 200) if filtered else limit + 1 - len(matched))
            batch = [(member.decode(), score) for member, score in self.redis.zrevrangebyscore(
                index, high, low, start=len(scanned), num=size, withscores=True)]
            scanned.extend(batch)
            matched.extend(entry for entry, fields in zip(batch, self._fields([i for i, _ in batch], _FILTER_FIELDS))
                           if _matches(fields, account_id, workflow, wanted))
            if len(batch) < size:
                exhausted = True
                break
        if len(matched) <= limit and exhausted:
            page, next_until = matched, None
        else:
            # Cut where the queue time changes: the next page (until is exclusive) starts with every run at or
            # below ``boundary``, looked at or not.
            boundary = matched[limit][1] if len(matched) > limit else scanned[-1][1]
            above = [score for _, score in scanned if score > boundary]
            if above:
                page, next_until = [m for m in matched if m[1] > boundary], min(above)
            else:  # more than a page of runs queued at one instant: the rest of them are not listed
                page, next_until = matched[:limit], boundary
        records = self.get_many([request_id for request_id, _ in page])
        return [r for r in records if r is not None and r.account == account_id], next_until

    def workflow_stats(self, account_id: str, ref: str, now: float, hours: int = 24) -> dict[str, Any]:
        """The workflow's runs of the ``hours`` up to ``now`` summed up (:func:`flowpool.runstats.workflow_stats`).

        At most ``runs_per_workflow`` runs are read, the newest; ``sampled`` says the window held more, read or
        dropped from the index already (it keeps that many).
        """
        index = keys.workflow_runs(account_id, ref)
        start = now - hours * 3600
        cap = self.runs_per_workflow
        pipe = self.redis.pipeline(transaction=False)
        # Up to +inf: a run queued a moment after ``now`` by another process's clock counts in the last bucket.
        pipe.zrevrangebyscore(index, "+inf", repr(start), start=0, num=cap + 1)
        pipe.zcard(index)
        pipe.zrange(index, 0, 0, withscores=True)
        members, total, oldest = pipe.execute()
        ids = [member.decode() for member in members[:cap]]
        # The index is trimmed to runs_per_workflow: when full, runs older than its oldest may be in the window too.
        dropped = total >= cap and bool(oldest) and oldest[0][1] > start
        records = []
        for request_id, fields in zip(ids, self._fields(ids, _STATS_FIELDS)):
            if fields is None or fields["account"] != account_id or fields["workflow"] != ref:
                continue
            records.append(RunRecord(request_id=request_id, account=account_id, workflow=ref, status=fields["status"],
                                     queued_at=fields["queued_at"], finished_at=fields["finished_at"]))
        return workflow_stats(records, now, hours, sampled=len(members) > cap or dropped)

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
