"""What a worker process holds besides Celery: Redis stores, the sandbox, warm scripts, a heartbeat."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import redis
from celery.worker import state

from flowpool import keys
from flowpool.cache import ResultCache
from flowpool.blobs import open_blob_store
from flowpool.connections import QUICK_SECONDS, UNREACHABLE, connect_cache_store, connect_redis
from flowpool.datastores import Datastores
from flowpool.datastores.embedding import EmbeddingClient
from flowpool.egress import EgressPolicy
from flowpool.errors import Cancelled
from flowpool.queues import queue_of_broker
from flowpool.registry import Accounts, Applications, ProviderKeys, Workflows
from flowpool.runs import RunStore
from flowpool.sealing import Sealer, ServerKey
from flowpool.sandbox import Sandbox, SandboxLimits
from flowpool.sandbox.session import StopRequest
from flowpool.settings import Settings
from flowpool.webhooks import WebhookStore

from .model_calls import ModelRouter
from .outbound import HttpClient
from .accessories import AccessoryCache
from .sealed import host_support_missing
from .scripts import ScriptCache
from .webhooks import WebhookDeliverer

__all__ = ["WorkerRuntime"]

log = logging.getLogger("flowpool.worker")


class WorkerRuntime:
    """Owns a worker's sandbox and Redis state; started and stopped with the Celery worker."""

    def __init__(self, settings: Settings, name: str | None = None, queues: list[str] | None = None,
                 slots: int | None = None) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        # The worker queues it consumes, and the runs it holds at once (its Celery concurrency): what its
        # heartbeat reports for GET /api/v1/pool and the queue gauges.
        self.queues = queues or settings.worker_queue_names
        self.slots = slots or settings.worker_concurrency
        self.redis = connect_redis(settings)
        # For writes a run's supervisor waits on (its chunks): given up within a second, tried again later.
        self.redis_quick = connect_redis(settings, socket_timeout=QUICK_SECONDS)
        self.runs = RunStore.for_settings(self.redis, settings)
        server_key = ServerKey(self.redis, settings.secret_key)
        self.cache = ResultCache(self.redis, server_key, connect_cache_store(settings))
        self.sealer = Sealer(server_key)  # opens the jobs' secrets and seals outputs carrying them
        self.scripts = ScriptCache(Workflows(self.redis), settings.script_cache_size)
        blobs = open_blob_store(settings, self.redis)  # one client (one S3 connection pool) for both users
        self.accessories = AccessoryCache(self.redis, settings, blobs)  # by content hash: memory, disk, blob store
        # Provider keys named by api_key_env are read from the worker's own
        # environment, at call time; they never enter the sandbox.
        egress = EgressPolicy(settings.egress_allow)
        self.http = HttpClient(egress, settings.http_max_response_bytes)
        self.models = ModelRouter(Applications(self.redis), egress, os.environ, ProviderKeys(settings.provider_keys),
                                  retries=settings.model_retries,
                                  connect_timeout=settings.model_connect_timeout_seconds)
        # ctx.datastore: this host's replicas (settings.cache_path), shared with its other flowpool processes.
        self.datastores = Datastores(self.redis, blobs, settings,
                                     embedder=EmbeddingClient.for_settings(settings, os.environ))
        # Webhooks of ended runs, POSTed from threads of their own through the same egress guard as runs' calls.
        self.webhooks = WebhookDeliverer(WebhookStore(self.redis, settings.run_ttl_seconds), self.runs,
                                         Accounts(self.redis), settings, egress)
        self._limits: dict[tuple, SandboxLimits] = {}
        self.sandbox = Sandbox(
            self.limits_for(None),
            # Twice the concurrency: each run may have a workflow it calls inline running too.
            slots=2 * settings.worker_concurrency,
            uid_base=settings.sandbox_uid_base,
            hard_grace_seconds=settings.hard_timeout_grace_seconds,
            max_seconds=settings.max_timeout_seconds,
            prestart=settings.sandbox_prestart,
            backend=settings.sandbox_backend,
            cgroups=settings.sandbox_cgroups,
            packages=settings.sandbox_packages,
            reuse=settings.sandbox_reuse,
            reuse_max_runs=settings.sandbox_reuse_max_runs,
            reuse_idle_seconds=settings.sandbox_reuse_idle_seconds,
        )
        self.lease_ms = int(settings.worker_ttl_seconds * 1000)
        self.active: dict[str, str] = {}  # request id -> the queue it came from, for each run claimed and going
        self.accounts: dict[str, str] = {}  # request id -> its account, for each run claimed and going
        self.stops: dict[str, StopRequest] = {}  # request id -> asked when its caller or the worker stops it
        # Set when a stopping worker stops the runs still going (tasks.run_task): what fails then is worker_lost.
        self.gave_up = threading.Event()
        # Set when a warm shutdown starts (tasks.run_task): the worker consumes nothing more, so its heartbeat
        # stops naming it a worker of its queues (a queue left with none answers 503 at once), while its report
        # still counts the runs it drains.
        self.draining = threading.Event()
        # The warm shutdown's signal handler runs in the main thread, wherever it was interrupted (perhaps inside
        # a lock): it only sets this flag and writes a byte, and the drainer thread does the rest (ask_drain).
        self._drain_asked = False
        self._drain_pipe = os.pipe()
        self._drainer = threading.Thread(target=self._await_drain, name="flowpool-drain", daemon=True)
        self._beat_lock = threading.Lock()  # a beat and the drain's writes one at a time: no beat undoes the drain
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="flowpool-heartbeat", daemon=True)

    def limits_for(self, asked: dict[str, int] | None) -> SandboxLimits:
        """The sandbox limits of a run of a workflow whose LIMITS are ``asked``, capped by the operator's settings."""
        key = tuple(sorted((asked or {}).items()))
        limits = self._limits.get(key)
        if limits is None:
            settings = self.settings
            values = settings.run_limits(asked)
            limits = SandboxLimits(
                memory_bytes=int(values["memory_mb"] or 0) << 20,
                processes=int(values["processes"] or 0),
                open_files=int(values["open_files"] or 0),
                file_bytes=min(settings.sandbox_max_file_mb, int(values["tmp_mb"] or 0)) << 20,
                tmp_bytes=int(values["tmp_mb"] or 0) << 20,
                cpu_seconds=values["cpu_seconds"],
                max_result_bytes=int(values["result_bytes"] or 0),
                max_log_bytes=int(values["log_bytes"] or 0),
                max_chunks=int(values["chunks"] or 0),
                max_chunk_bytes=settings.max_chunk_bytes,
                max_json_depth=settings.max_json_depth,
            )
            self._limits[key] = limits
        return limits

    def start(self) -> None:
        self.sandbox.start()
        self._beat.start()
        self._drainer.start()
        self.webhooks.start()
        log.info("flowpool worker %s ready, %d slots; sandbox: %s", self.name, self.slots,
                 self.sandbox.describe())
        for weakness in self.sandbox.weaknesses:
            log.warning("sandbox: %s", weakness)
        host_support_missing()  # memfd_create and /proc, which accessories need: what lacks is logged now
        try:  # for `flowpool doctor`, which may run elsewhere than this worker
            self.redis.hset(keys.WORKER_SANDBOXES, self.name, json.dumps({
                "backend": self.sandbox.backend, "isolation": self.sandbox.describe(),
                "run_limits": self.sandbox.run_limits, "weaknesses": self.sandbox.weaknesses}))
        except redis.RedisError as exc:
            log.warning("could not publish the sandbox's description: %s", exc)

    def ask_drain(self) -> None:
        """Begin the drain, from a signal handler: a flag and a byte written, no lock taken (the drainer follows)."""
        self._drain_asked = True
        try:
            os.write(self._drain_pipe[1], b"d")
        except OSError:
            pass

    def is_draining(self) -> bool:
        """Whether a warm shutdown began: the worker takes no more runs."""
        return self._drain_asked or self.draining.is_set()

    def _await_drain(self) -> None:
        if os.read(self._drain_pipe[0], 1) == b"d":
            self.stop_serving()

    def stop_serving(self) -> None:
        """A warm shutdown began: stop naming this worker a worker of its queues, now and in later beats."""
        self.draining.set()
        with self._beat_lock:  # after any beat under way, which may have read the flag before it was set
            try:
                pipe = self.redis.pipeline(transaction=False)
                for queue in self.queues:
                    pipe.zrem(keys.queue_workers(queue), self.name)
                pipe.hset(keys.WORKER_POOL, self.name, json.dumps(self.pool_report(time.time())))  # draining
                pipe.execute()
            except redis.RedisError:
                pass  # the next beat does it

    def stop(self) -> None:
        self._stop.set()
        self.webhooks.stop()
        if self._beat.is_alive():
            self._beat.join(5)
        if self._drainer.is_alive():
            os.write(self._drain_pipe[1], b"q")  # no drain asked: let it go
            self._drainer.join(5)
        for fd in self._drain_pipe:
            os.close(fd)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(keys.WORKERS, self.name)
            for queue in self.queues:
                pipe.zrem(keys.queue_workers(queue), self.name)
            pipe.hdel(keys.WORKER_POOL, self.name)
            pipe.hdel(keys.WORKER_SANDBOXES, self.name)
            pipe.execute()
        except redis.RedisError:
            pass
        self.sandbox.stop()

    # After a beat Redis did not take, the next one comes this soon (or at the interval, if shorter).
    _BEAT_RETRY_SECONDS = 0.25

    def _heartbeat(self) -> None:
        """Say the worker is alive, keep the leases of its runs fresh, and now and then end overdue runs.

        A beat Redis did not take is tried again soon; a beat held up longer
        than the interval (a paused Redis) carried a stale time, so a fresh one
        follows at once: the API must not take the worker for gone, nor the
        waiters its runs for lost.
        """
        interval = self.settings.worker_heartbeat_seconds
        next_reap = time.monotonic()
        failing = False
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._send_beat()
                if began >= next_reap:
                    next_reap = began + self.settings.worker_ttl_seconds
                    self.runs.reap(self.settings.run_reap_margin, self.settings.worker_ttl_seconds)
                if failing:
                    log.warning("heartbeat: Redis answers again")
                failing = False
                pause = interval if time.monotonic() - began < interval else 0.0
            except redis.RedisError as exc:
                if not failing:
                    log.warning("heartbeat failed: %s", exc)
                failing = isinstance(exc, UNREACHABLE)
                pause = min(interval, self._BEAT_RETRY_SECONDS)
            self._stop.wait(pause)

    def pool_report(self, now: float) -> dict[str, object]:
        """What this worker holds, per queue, as its heartbeat writes it in ``keys.WORKER_POOL``.

        ``running``: runs claimed and going. ``reserved``: messages Celery
        took for this worker whose run it has not claimed yet (with prefetch
        off, only those between their fetch and their start).
        """
        running = dict.fromkeys(self.queues, 0)
        for queue in list(self.active.values()):
            running[queue] = running.get(queue, 0) + 1
        reserved = dict.fromkeys(self.queues, 0)
        claimed = set(self.active)  # a task's id is its run's request id
        for request in list(state.reserved_requests):
            # Taken from the broker and not claimed yet: waiting for a thread, or loading its script and
            # starting its run process (the claim overlaps that), or retrying its claim through a Redis outage.
            queue = queue_of_broker(str((request.delivery_info or {}).get("routing_key") or ""))
            if queue is not None and request.id not in claimed:
                reserved[queue] = reserved.get(queue, 0) + 1
        return {"queues": self.queues, "slots": self.slots, "running": running, "reserved": reserved, "at": now,
                "draining": self.is_draining()}

    def _send_beat(self) -> None:
        """One heartbeat: the worker's time in WORKERS and in each of its queues, what it holds per queue, each run's
        lease set afresh, cancel requests read."""
        with self._beat_lock:
            self._beat_once()

    def _beat_once(self, reloaded: bool = False) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.WORKERS, {self.name: now})
        for queue in self.queues:
            if self.is_draining():  # it takes no more runs: no queue is served by it any more
                pipe.zrem(keys.queue_workers(queue), self.name)
            else:
                pipe.zadd(keys.queue_workers(queue), {self.name: now})
        pipe.hset(keys.WORKER_POOL, self.name, json.dumps(self.pool_report(now)))
        first = 2 + len(self.queues)  # replies before the leases'
        active = list(self.active)
        for request_id in active:
            # SET, not PEXPIRE: a lease that ran out while Redis was paused or down comes back.
            pipe.set(keys.run_lease(request_id), self.name, px=self.lease_ms)
            pipe.exists(keys.run_cancel(request_id))
        # Each run's concurrency slot scored by its lease's expiry, as CLAIM scored it: a killed worker's slots
        # lapse with its leases, and a slot that lapsed while the beats were held up comes back. Only while the
        # run is still this worker's and running: a slot its end gave back meanwhile stays given back.
        self.runs.renew_slots(pipe, list(self.accounts.items()), self.name, self.lease_ms)
        try:
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:
            if reloaded:
                raise
            # Redis lost its scripts (a restart): the rest of the beat was written; load the renewal's, beat again.
            self.runs.load_renewal()
            return self._beat_once(reloaded=True)
        for request_id, asked in zip(active, replies[first + 1::2]):
            stop = self.stops.get(request_id)
            if asked and stop is not None:
                stop.ask(Cancelled("the caller went away and asked for the run to be cancelled"))
