"""What every request of an API process shares: the stores, the Celery sender, and who is asking.

Blueprints reach these through the app (``current_app.extensions``), never by
importing ``api/app.py``: the app imports the blueprints, not the other way.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import redis
from flask import current_app, g, request

from flowpool import keys
from flowpool.blobs import open_blob_store
from flowpool.cache import ResultCache
from flowpool.connections import connect_cache_store, connect_redis
from flowpool.datastores import Datastores
from flowpool.datastores.embedding import EmbeddingClient
from flowpool.errors import AuthenticationError
from flowpool.limits import LimitStore
from flowpool.pool import PoolReader, live_queue_workers
from flowpool.publish import RunSender
from flowpool.queues import DEFAULT_QUEUE
from flowpool.registry import Account, Accounts, Agents, Applications, ProviderKeys, ResolvedWorkflow, Workflows
from flowpool.runs import RunStore
from flowpool.sealing import Sealer, ServerKey
from flowpool.settings import Settings
from flowpool.tasks.app import create_celery
from flowpool.webhooks import WebhookStore

__all__ = ["EXTENSION", "KEY_HEADERS", "Services", "authenticate", "bearer_token", "mark", "services"]

EXTENSION = "flowpool"  # the key of the Services in app.extensions

log = logging.getLogger("flowpool.api")


class Services:
    """Redis-backed stores and the Celery sender of one API process."""

    # How long a "some worker serving the queue is alive" answer is reused: a dead pool is
    # noticed within this plus the worker TTL.
    _WORKERS_MEMORY_SECONDS = 1.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = connect_redis(settings)
        self.accounts = Accounts(self.redis)
        self.blobs = open_blob_store(settings, self.redis)
        self.workflows = Workflows.for_settings(self.redis, settings, self.blobs)
        self.applications = Applications(self.redis)
        self.agents = Agents(self.redis)
        self.provider_keys = ProviderKeys(settings.provider_keys)
        # Ingest embeds records without vectors, search embeds queries, for stores naming an endpoint; the
        # key named by api_key_env is read from this process's environment, like a worker's provider keys.
        self.datastores = Datastores(self.redis, self.blobs, settings,
                                     embedder=EmbeddingClient.for_settings(settings, os.environ))
        self.runs = RunStore.for_settings(self.redis, settings)
        self.webhooks = WebhookStore(self.redis, settings.run_ttl_seconds)
        self.limits = LimitStore(self.redis, settings)  # each account's limits: the operator's, else the defaults
        server_key = ServerKey(self.redis, settings.secret_key)
        self.cache = ResultCache(self.redis, server_key, connect_cache_store(settings))
        self.sealer = Sealer(server_key)  # the secrets of jobs on their way to the workers
        self.celery = create_celery(settings)
        self.sender = RunSender(self.celery, settings)  # sends runs; the held client of a Redis broker
        self.pool = PoolReader(settings, self.redis)  # what GET /api/v1/pool and the queue gauges read
        self._workers_seen_until: dict[str, float] = {}  # queue -> until when a live worker is taken as seen
        self._slots: tuple[float, dict[str, int]] = (0.0, {})  # until when, and the live workers' slots per queue
        self._next_reap = 0.0
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
        workflow = self.workflows.resolve(account_id, ref, version)
        with self._lock:
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            self._resolved[key] = (now + self._RESOLVED_SECONDS, workflow)
        return workflow

    def live_workers(self, queue: str | None = None) -> int:
        """How many workers (consuming ``queue``; None: any) sent a heartbeat within the worker TTL."""
        if queue is None:
            return self.redis.zcount(keys.WORKERS, time.time() - self.settings.worker_ttl_seconds, "+inf")
        return len(live_queue_workers(self.redis, queue, self.settings.worker_ttl_seconds))

    def queue_slots(self, queue: str) -> int:
        """Run slots of the live, not draining workers consuming ``queue`` (answered from memory for up to a
        second): what fair share divides between the accounts with runs in flight (flowpool.quotas)."""
        until, slots = self._slots
        if time.monotonic() >= until:
            slots = {}
            for worker in self.pool.read_workers(time.time()):
                if not worker.draining:
                    for name in worker.queues:
                        slots[name] = slots.get(name, 0) + worker.slots
            self._slots = (time.monotonic() + self._WORKERS_MEMORY_SECONDS, slots)
        return slots.get(queue, 0)

    # How often one look for a fresh heartbeat is made while none is seen.
    _WORKERS_LOOK_SECONDS = 0.1

    def workers_alive(self, queue: str = DEFAULT_QUEUE) -> bool:
        """Whether a worker consuming ``queue`` is alive (answered from memory for up to a second).

        When no fresh heartbeat is seen, it looks again for one heartbeat
        interval and a half before saying no: after a pause of Redis, the
        workers held up behind it beat again within that, and their last
        heartbeat looks stale until they do.
        """
        if time.monotonic() < self._workers_seen_until.get(queue, 0.0):
            return True
        self.reap_now_and_then()
        give_up_at = time.monotonic() + 1.5 * self.settings.worker_heartbeat_seconds
        while self.live_workers(queue) == 0:
            if time.monotonic() >= give_up_at:
                return False
            time.sleep(self._WORKERS_LOOK_SECONDS)
        self._workers_seen_until[queue] = time.monotonic() + self._WORKERS_MEMORY_SECONDS
        return True

    def reap_now_and_then(self) -> None:
        """End runs left unfinished long past their deadline (:meth:`RunStore.reap`), off the request's path.

        At most once per worker TTL per process, in a thread of its own; the
        workers do it too, and a lock in Redis lets one process do each pass.
        """
        now = time.monotonic()
        with self._lock:
            if now < self._next_reap:
                return
            self._next_reap = now + self.settings.worker_ttl_seconds
        threading.Thread(target=self._reap, name="flowpool-reaper", daemon=True).start()

    def _reap(self) -> None:
        try:
            self.runs.reap(self.settings.run_reap_margin, self.settings.worker_ttl_seconds)
        except redis.RedisError as exc:  # unreachable, or refusing writes (out of memory): the next pass tries again
            log.warning("could not end overdue runs: %s", exc)


def mark(name: str) -> None:
    """Close a phase of this request, reported in its ``Server-Timing`` header."""
    now = time.perf_counter()
    g.phases.append((name, now - g.phase_start))
    g.phase_start = now


def services() -> Services:
    """The services of the app serving this request."""
    return current_app.extensions[EXTENSION]


# The headers that carry an API key, in the order they are read when several are sent: flowpool's own, then the
# one the seed's management API documents (so its scripts and CI jobs work unchanged), then Authorization.
KEY_HEADERS = ("x-api-key", "X-Maitai-Api-Key")


def authenticate() -> Account:
    """The account of the request's API key (``x-api-key``, ``X-Maitai-Api-Key`` or ``Authorization: Bearer``)."""
    account = g.get("account")
    if account is None:
        key = next(filter(None, map(request.headers.get, KEY_HEADERS)), None)
        if not key:
            auth = request.headers.get("Authorization", "")
            token = bearer_token(auth)
            if auth and token is None:
                raise AuthenticationError("the Authorization header must be 'Bearer <key>'")
            key = token or ""
        account = g.account = services().accounts.authenticate(key)
    return account


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None without one, or for another scheme."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
