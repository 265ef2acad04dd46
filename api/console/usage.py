"""The console's usage page: runs, compute seconds and tokens per UTC day, today's use against the account's
limits, and tokens by model; the same reader and range rules as GET /api/v1/usage (flowpool.usage)."""
from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Response, request

from flowpool.errors import RequestError
from flowpool.usage import UsageReader, usage_range

from ..services import services
from . import bp
from .charts import Series, bar_chart
from .common import render, signed_in
from .formats import format_number

# Today's use against each daily limit: (label, what today counts, the limit's name). 0 as a limit means none.
_METERS = (("Compute seconds today", "compute_seconds", "compute_seconds_per_day"),
           ("Tokens today", "tokens", "tokens_per_day"),
           ("Runs in flight", "in_flight", "concurrency"))


def _charts(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The three per-day bar charts: runs (succeeded, and the rest stacked over them), compute seconds, tokens."""
    labels = [group["day"][5:] for group in groups]  # MM-DD: the range and the axis title say the year
    succeeded = [group["runs"].get("succeeded", 0) for group in groups]
    other = [group["runs_total"] - ok for group, ok in zip(groups, succeeded)]
    return {
        "runs": bar_chart(labels, [Series("bar-ok", "succeeded", succeeded),
                                   Series("bar-error", "did not succeed", other)], y_label="runs", x_label="UTC day",
                          integer=True),
        "compute": bar_chart(labels, [Series("bar-compute", "compute seconds",
                                             [group["compute_seconds"] for group in groups])],
                             y_label="compute seconds", x_label="UTC day"),
        "tokens": bar_chart(labels, [Series("bar-tokens", "tokens", [group["tokens"]["total"] for group in groups])],
                            y_label="tokens", x_label="UTC day", integer=True),
    }


def _meters(today: dict[str, Any], limits: dict[str, int]) -> list[dict[str, Any]]:
    return [{"label": label, "used": today[used], "limit": limits[limit], "limit_name": limit,
             "text": f"{format_number(today[used])} of {format_number(limits[limit])}" if limits[limit]
             else f"{format_number(today[used])} (no limit)"}
            for label, used, limit in _METERS]


@bp.get("/usage")
def usage() -> Response:
    """What the account used per day of ``from``..``to`` (YYYY-MM-DD, UTC; default the last 30 days)."""
    account = signed_in()
    svc = services()
    asked = {"from": request.args.get("from") or "", "to": request.args.get("to") or ""}
    try:
        from_day, to_day, _ = usage_range(asked["from"] or None, asked["to"] or None, None,
                                          svc.settings.usage_retention_days)
    except RequestError as exc:
        return render("console/usage.html", title="Usage", nav="usage", status=exc.status, error=exc.message,
                      asked=asked)
    reader = UsageReader(svc.redis)
    data = reader.read(account.id, from_day, to_day, "day")
    limits, own = svc.limits.get(account.id)
    today = reader.today(account.id)
    totals = data["totals"]
    used = bool(totals["runs_total"] or totals["cache_hits"] or totals["compute_seconds"] or totals["tokens"]["total"])
    # When the UTC day began: the page shows it in the viewer's zone, so a day's edge reads in their own time.
    day_start = dt.datetime.combine(dt.datetime.now(dt.timezone.utc).date(), dt.time(), dt.timezone.utc).timestamp()
    return render("console/usage.html", title="Usage", nav="usage", asked={"from": data["from"], "to": data["to"]},
                  day_start=day_start,
                  usage=data, totals=totals, used=used, charts=_charts(data["groups"]) if used else None,
                  today=today, limits=limits.to_dict(), own_limits=sorted(own), rpm=limits.rpm,
                  meters=_meters(today, limits.to_dict()))
