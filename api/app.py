"""The Flask app factory: one app per settings, its blueprints, error rendering and timing."""
from __future__ import annotations

import logging
import time

from typing import Any

from flask import Flask, g
from flask.json.provider import DefaultJSONProvider

from flowpool.settings import Settings

from . import (admin, agents, applications, datastores, health, invoke, metrics, openapi, pool, preview, runs, usage,
               workflows)
from .body import close_when_body_unread, read_body
from .console import views as console  # importing the views registers them on console.bp
from .errors import register_error_handlers
from .services import EXTENSION, Services

__all__ = ["create_app"]


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing NaN and Infinity: Python would write them as bare words no JSON parser reads."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API app from ``settings`` (read from the environment when not given)."""
    settings = settings or Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask("flowpool", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json = StrictJSONProvider(app)
    app.extensions[EXTENSION] = Services(settings)
    register_error_handlers(app)
    for blueprint in (invoke.bp, workflows.bp, preview.bp, runs.bp, applications.bp, agents.bp, datastores.bp,
                      health.bp, openapi.bp, metrics.bp, pool.bp, usage.bp, admin.bp):
        app.register_blueprint(blueprint)
    if settings.console_enabled:
        app.register_blueprint(console.bp)

    @app.before_request
    def _start_timer() -> None:
        g.started = g.phase_start = time.perf_counter()
        g.phases = []

    app.before_request(read_body)
    app.wsgi_app = close_when_body_unread(app.wsgi_app)  # type: ignore[method-assign]

    @app.after_request
    def _server_timing(response):  # type: ignore[no-untyped-def]
        started = g.get("started")
        if started is not None:
            phases = "".join(f", {name};dur={seconds * 1000:.3f}" for name, seconds in g.phases)
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.3f}{phases}"
        return response

    return app
