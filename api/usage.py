"""``GET /api/v1/usage``: what the caller's account used, per UTC day or per workflow (flowpool.usage)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from flowpool.usage import UsageReader, usage_range

from .services import authenticate, services

bp = Blueprint("usage", __name__)


@bp.get("/api/v1/usage")
def get_usage():  # type: ignore[no-untyped-def]
    """The account's runs by status, compute seconds, tokens by model and cache hits, with its limits and today's use.

    ``from`` and ``to`` (YYYY-MM-DD, UTC, both included) default to the last
    30 days; ``group_by`` is ``day`` (the default) or ``workflow``.
    """
    account = authenticate()
    svc = services()
    from_day, to_day, group_by = usage_range(request.args.get("from"), request.args.get("to"),
                                             request.args.get("group_by"), svc.settings.usage_retention_days)
    reader = UsageReader(svc.redis)
    usage = reader.read(account.id, from_day, to_day, group_by)
    limits, _ = svc.limits.get(account.id)
    return jsonify({"data": {**usage, "limits": limits.to_dict(), "today": reader.today(account.id)}})
