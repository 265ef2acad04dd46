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

__all__ = ["WORKFLOW_PREFIX", "day_of"]

WORKFLOW_PREFIX = "wf:"


def day_of(timestamp: float) -> str:
    """The UTC day of a unix time, as usage keys name it: ``YYYY-MM-DD``."""
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d")
