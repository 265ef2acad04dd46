"""What each account used, per UTC day: runs by status, compute seconds, model-call tokens, cache hits.

One Redis hash per account and day (``keys.account_usage``). Its fields, all
integers added to as runs end (``run_scripts``: FINISH, ABANDON) and as the
cache answers (BEGIN):

- ``runs:<status>``: runs that ended that day, by final status (a cache hit is not a run here);
- ``cache_hits``: requests answered from the result cache;
- ``compute_ms``: milliseconds the runs that ended that day held a worker slot (claimed to ended);
- ``tokens``, ``prompt_tokens``, ``completion_tokens``: their model calls' tokens;
- ``model_tokens:<model>``: their model calls' total tokens by model;
- each of these again per workflow, prefixed ``wf:<ref>:`` (a ref name holds no ``:``).

The daily budgets (FLOWPOOL_DEFAULT_TOKENS_PER_DAY, ..._COMPUTE_SECONDS_PER_DAY)
are checked against today's ``tokens`` and ``compute_ms``.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowpool import keys
from flowpool.errors import RequestError

if TYPE_CHECKING:
    import redis

__all__ = ["GROUP_BY", "WORKFLOW_PREFIX", "Usage", "UsageReader", "day_of", "usage_range"]

WORKFLOW_PREFIX = "wf:"
GROUP_BY = ("day", "workflow")  # how GET /api/v1/usage may split its range
DEFAULT_DAYS = 30  # the range GET /api/v1/usage reads when given none: the last 30 days, today included


def day_of(timestamp: float) -> str:
    """The UTC day of a unix time, as usage keys name it: ``YYYY-MM-DD``."""
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d")


def usage_range(from_text: str | None, to_text: str | None, group_by: str | None, retention_days: int,
                today: dt.date | None = None) -> tuple[dt.date, dt.date, str]:
    """The days and grouping a usage request asks for: a 400 naming the parameter when one is bad.

    Defaults: the last :data:`DEFAULT_DAYS` days up to ``to`` (today, UTC),
    grouped by day. A range longer than the retention could only show days
    already dropped, and is refused rather than read.
    """
    today = today or dt.datetime.now(dt.timezone.utc).date()
    to_day = _day(to_text, "to") if to_text else today
    from_day = _day(from_text, "from") if from_text else to_day - dt.timedelta(days=DEFAULT_DAYS - 1)
    if from_day > to_day:
        raise RequestError(f"from ({from_day}) is after to ({to_day})", param="from")
    days = (to_day - from_day).days + 1
    if days > retention_days:
        raise RequestError(f"the range from {from_day} to {to_day} is {days} days; usage is kept "
                           f"{retention_days} days (FLOWPOOL_USAGE_RETENTION_DAYS), so ask for at most that many",
                           param="from")
    group_by = group_by or "day"
    if group_by not in GROUP_BY:
        raise RequestError(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by[:40]!r}", param="group_by")
    return from_day, to_day, group_by


def _day(text: str, name: str) -> dt.date:
    try:
        if len(text) != 10:
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise RequestError(f"{name} must be a day as YYYY-MM-DD, got {text[:40]!r}", param=name) from None


@dataclass
class Usage:
    """The sums of some daily usage hashes' fields (one day, one workflow, or all of them)."""

    runs: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    compute_ms: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_model: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: int) -> None:
        """Add one hash field (without its ``wf:<ref>:`` prefix); a field this reader does not know is skipped."""
        kind, _, rest = name.partition(":")
        if kind == "runs" and rest:
            self.runs[rest] = self.runs.get(rest, 0) + value
        elif kind == "model_tokens" and rest:  # a model name may hold ':' itself: all after the first is the name
            self.by_model[rest] = self.by_model.get(rest, 0) + value
        elif name in ("cache_hits", "compute_ms", "tokens", "prompt_tokens", "completion_tokens"):
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, Any]:
        """As GET /api/v1/usage shows it."""
        return {"runs": dict(sorted(self.runs.items())), "runs_total": sum(self.runs.values()),
                "compute_seconds": round(self.compute_ms / 1000, 3),
                "tokens": {"total": self.tokens, "prompt": self.prompt_tokens, "completion": self.completion_tokens,
                           "by_model": dict(sorted(self.by_model.items()))},
                "cache_hits": self.cache_hits}


class UsageReader:
    """Read an account's daily usage hashes: what GET /api/v1/usage and `flowpool usage` show."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def read(self, account_id: str, from_day: dt.date, to_day: dt.date, group_by: str = "day") -> dict[str, Any]:
        """The usage of the days ``from_day`` to ``to_day`` (inclusive): totals, and groups by day (every day of
        the range, in order, those without usage as zeros) or by workflow (those with usage, by name).

        One round trip: an HGETALL per day, pipelined.
        """
        days = [from_day + dt.timedelta(days=n) for n in range((to_day - from_day).days + 1)]
        pipe = self.redis.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(keys.account_usage(account_id, day.isoformat()))
        totals, groups = Usage(), {}
        for day, fields in zip(days, pipe.execute()):
            by_day = groups.setdefault(day.isoformat(), Usage()) if group_by == "day" else None
            for raw_name, raw_value in fields.items():
                name, value = raw_name.decode(), int(raw_value)
                if name.startswith(WORKFLOW_PREFIX):
                    ref, _, name = name[len(WORKFLOW_PREFIX):].partition(":")
                    if group_by == "workflow":
                        groups.setdefault(ref, Usage()).add(name, value)
                    continue
                totals.add(name, value)
                if by_day is not None:
                    by_day.add(name, value)
        return {"from": from_day.isoformat(), "to": to_day.isoformat(), "group_by": group_by,
                "totals": totals.to_dict(),
                "groups": [{group_by: name, **usage.to_dict()} for name, usage in sorted(groups.items())]}

    def today(self, account_id: str, now: float | None = None) -> dict[str, Any]:
        """What the daily budgets and the concurrency limit are checked against now: today's (UTC) compute
        seconds and tokens, and the runs in flight (queued or running; read only, lapsed slots not counted)."""
        if now is None:  # Redis's clock, by which admission prunes the slots and days are counted
            seconds, micros = self.redis.time()
            now = seconds + micros / 1e6
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(keys.account_usage(account_id, day_of(now)), "compute_ms", "tokens")
        pipe.zcount(keys.account_slots(account_id), f"({now}", "+inf")
        (compute_ms, tokens), in_flight = pipe.execute()
        return {"compute_seconds": round(int(compute_ms or 0) / 1000, 3), "tokens": int(tokens or 0),
                "in_flight": in_flight}
