"""``GET /api/v1/pool``: the demand signal of each worker queue, for operators and autoscalers (flowpool.pool)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from .operators import require_operator
from .services import services

bp = Blueprint("pool", __name__)


@bp.get("/api/v1/pool")
def get_pool():  # type: ignore[no-untyped-def]
    """Per worker queue: runs queued, reserved and running, slots, live workers and the workers it needs."""
    require_operator()
    return jsonify(services().pool.read().to_dict())
