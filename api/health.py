"""Liveness and readiness probes."""
from __future__ import annotations

from flask import Blueprint, jsonify

from .services import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    """The process is up."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Redis answers, and at least one worker sent a heartbeat recently or an autoscaler starts workers from zero.

    With FLOWPOOL_AUTOSCALED_QUEUES set, the API takes runs while no worker
    runs (they wait in their queue, and the demand signal starts one): it is
    ready then, or an autoscaler at zero workers would find no API to ask.
    """
    svc = services()
    checks: dict[str, object] = {}
    try:
        svc.redis.ping()
        checks["redis"] = "ok"
        checks["workers"] = svc.live_workers()
    except Exception as exc:  # any failure here means not ready
        checks["redis"] = f"unreachable: {exc}"
        checks["workers"] = 0
    scaled = sorted(svc.settings.autoscaled_queue_names)
    if scaled:
        checks["autoscaled_queues"] = scaled
    ready = checks["redis"] == "ok" and (checks["workers"] > 0 or bool(scaled))  # type: ignore[operator]
    return jsonify({"status": "ready" if ready else "not ready", "checks": checks}), 200 if ready else 503
