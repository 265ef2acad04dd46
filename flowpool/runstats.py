"""A workflow's recent runs summed up: how many, how many failed, how long they took, hour by hour.

:func:`workflow_stats` does the math and no I/O; :meth:`RunStore.workflow_stats <flowpool.runs.RunStore>` reads
the records of the window from the workflow's run index and hands them here.

- A run belongs to the window, and to a bucket, by when it was queued; the
  window is the ``hours`` up to ``now`` and its buckets split it evenly,
  oldest first (a run queued after ``now``, by another process's clock, goes
  in the last one).
- An error is a run that ended with any status but ``succeeded``; the error
  rate is the errors over the runs that ended (``ended``), None while none
  has: a queued or running run has no outcome yet, so 1 failed and 9
  running runs are an error rate of 100%, not 10%.
- Latency is ``finished_at - queued_at`` of the runs that ended (queued and
  running ones have none yet); percentiles are nearest-rank, in milliseconds.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from flowpool.run import ERRORED, UNENDED, RunRecord

__all__ = ["percentile", "workflow_stats"]


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ascending ``ordered``; None when it is empty."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _summary(records: Iterable[RunRecord]) -> dict[str, Any]:
    """Runs, the runs that ended, errors and latency percentiles of ``records`` (an unended run counts as a run,
    never as an error nor in latency)."""
    runs = ended = errors = 0
    latencies: list[float] = []
    for record in records:
        runs += 1
        if record.status in UNENDED:
            continue
        ended += 1
        if record.status in ERRORED:
            errors += 1
        if record.finished_at is not None and record.queued_at is not None:
            latencies.append(max(0.0, (record.finished_at - record.queued_at) * 1000))
    latencies.sort()
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    return {"runs": runs, "ended": ended, "errors": errors,
            "p50_ms": None if p50 is None else round(p50, 3), "p95_ms": None if p95 is None else round(p95, 3)}


def workflow_stats(records: Iterable[RunRecord], now: float, hours: int = 24, bucket_seconds: int = 3600,
                   sampled: bool = False) -> dict[str, Any]:
    """The runs of the ``hours`` up to ``now`` among ``records``, in total and per ``bucket_seconds``.

    ``error_rate`` is ``errors / ended``, None while no run has ended. ``sampled``: the records are not all the
    window held (its index keeps a bounded number); it is passed through. Records queued before the window, or
    never queued, are left out.
    """
    if hours <= 0 or bucket_seconds <= 0 or (hours * 3600) % bucket_seconds:
        raise ValueError(f"{hours} hours do not split into buckets of {bucket_seconds}s")
    count = hours * 3600 // bucket_seconds
    start = now - hours * 3600
    per_bucket: list[list[RunRecord]] = [[] for _ in range(count)]
    for record in records:
        if record.queued_at is None or record.queued_at < start:
            continue
        index = min(count - 1, int((record.queued_at - start) // bucket_seconds))
        per_bucket[index].append(record)
    total = _summary(record for bucket in per_bucket for record in bucket)
    return {
        "hours": hours, **total, "error_rate": total["errors"] / total["ended"] if total["ended"] else None,
        "buckets": [{"start": start + i * bucket_seconds, **_summary(bucket)} for i, bucket in enumerate(per_bucket)],
        "sampled": sampled,
    }
