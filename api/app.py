"""The Flask app factory and the services each API process shares between requests."""
from __future__ import annotations

import logging
import threading
import time

from flask import Flask, current_app, g, request

from flowpool import keys
from flowpool.cache import ResultCache
from flowpool.errors import AuthenticationError
from flowpool.registry import Account, Accounts, Agents, Applications, Registry, ResolvedWorkflow
from flowpool.runs import RunStore
from flowpool.settings import Settings
from flowpool.tasks import create_celery
from flowpool.tasks.worker import connect_redis

from .errors import register_error_handlers

__all__ = ["Services", "create_app", "services", "authenticate", "mark"]


class Services:
    """Redis-backed stores and the Celery sender of one API process."""

    # How long a "some worker is alive" answer is reused: a dead pool is
    # noticed within this plus the worker TTL.
    _WORKERS_MEMORY_SECONDS = 1.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = connect_redis(settings)
        self.accounts = Accounts(self.redis)
        self.registry = Registry(self.redis)
        self.applications = Applications(self.redis)
        self.agents = Agents(self.redis)
        self.runs = RunStore(self.redis, settings.run_ttl_seconds, settings.runs_per_workflow)
        self.cache = ResultCache(self.redis, settings.secret_key)
        self.celery = create_celery(settings)
        self._workers_seen_until = 0.0
        self._resolved: dict[tuple[str, str, str | None], tuple[float, ResolvedWorkflow]] = {}
        self._lock = threading.Lock()

    # Resolved workflows are remembered; RunStore.begin checks the workflow's
    # revision in the same round trip, so a stale answer is never acted on.
    _RESOLVED_SECONDS = 30.0

    def resolve(self, account_id: str, ref: str, version: str | None, fresh: bool = False) -> ResolvedWorkflow:
        """The workflow version a request runs, from memory unless ``fresh``."""
        key = (account_id, ref, version)
        now = time.monotonic()
        if not fresh:
            remembered = self._resolved.get(key)
            if remembered is not None and remembered[0] > now:
                return remembered[1]
        workflow = self.registry.resolve(account_id, ref, version)
        with self._lock:
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            self._resolved[key] = (now + self._RESOLVED_SECONDS, workflow)
        return workflow

    def live_workers(self) -> int:
        """How many workers sent a heartbeat within the worker TTL."""
        now = time.time()
        return self.redis.zcount(keys.WORKERS, now - self.settings.worker_ttl_seconds, "+inf")

    def workers_alive(self) -> bool:
        """Whether any worker is alive (answered from memory for up to a second)."""
        if time.monotonic() < self._workers_seen_until:
            return True
        if self.live_workers() > 0:
            self._workers_seen_until = time.monotonic() + self._WORKERS_MEMORY_SECONDS
            return True
        return False


def mark(name: str) -> None:
    """Close a phase of this request, reported in its ``Server-Timing`` header."""
    now = time.perf_counter()
    g.phases.append((name, now - g.phase_start))
    g.phase_start = now


def services() -> Services:
    return current_app.extensions["flowpool"]


def authenticate() -> Account:
    """The account of the request's API key (``x-api-key`` or ``Authorization: Bearer``)."""
    account = g.get("account")
    if account is None:
        key = request.headers.get("x-api-key")
        if not key:
            auth = request.headers.get("Authorization", "")
            scheme, _, token = auth.partition(" ")
            if auth and scheme.lower() != "bearer":
                raise AuthenticationError("the Authorization header must be 'Bearer <key>'")
            key = token.strip()
        account = g.account = services().accounts.authenticate(key)
    return account


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API app from ``settings`` (read from the environment when not given)."""
    from . import agents, applications, health, invoke, metrics, openapi, runs, workflows

    settings = settings or Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask("flowpool", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["flowpool"] = Services(settings)
    register_error_handlers(app)
    for blueprint in (invoke.bp, workflows.bp, runs.bp, applications.bp, agents.bp, health.bp, openapi.bp,
                      metrics.bp):
        app.register_blueprint(blueprint)

    @app.before_request
    def _start_timer() -> None:
        g.started = g.phase_start = time.perf_counter()
        g.phases = []

    @app.after_request
    def _server_timing(response):  # type: ignore[no-untyped-def]
        started = g.get("started")
        if started is not None:
            phases = "".join(f", {name};dur={seconds * 1000:.3f}" for name, seconds in g.phases)
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.3f}{phases}"
        return response

    return app
