"""The demand signal: what waits, what is held and what runs on each worker queue, and how many workers it needs.

A worker queue's length alone misleads an autoscaler: a run a worker fetched
(reserved) or runs is no longer in the queue, so a pool busy with long runs
shows an empty queue and gets scaled in under its runs. Here each queue's
demand counts all three, from two reads:

- the workers' own reports (``keys.WORKER_POOL``, written with each heartbeat
  by ``tasks.worker``), kept only for the workers whose heartbeat in
  ``keys.WORKERS`` is within the worker TTL: a worker killed outright stops
  counting within the TTL, its last report left unread;
- the broker queue of each queue (``flowpool.queues.broker_queue``): the
  lengths of its lists in the broker's Redis (one per fair-share lane), or
  with another broker (amqp) the message count of a passive declare.

``desired_workers`` is what GET /api/v1/pool and the
``flowpool_queue_desired_workers`` gauge give a KEDA ScaledObject or an HPA
with a target of 1 per worker. :func:`queue_demand` does the arithmetic
without I/O; :class:`PoolReader` does the reads.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import redis

from . import keys
from .connections import connect_redis
from .errors import Unavailable
from .publish import LANES, lane_list
from .queues import DEFAULT_QUEUE, broker_queue, is_queue_name
from .settings import Settings

__all__ = ["PoolReader", "PoolState", "QueueDemand", "WorkerReport", "declared_lengths", "desired_workers",
           "live_queue_workers", "parse_report", "queue_demand"]


@dataclass(frozen=True)
class WorkerReport:
    """One live worker as its last heartbeat described it."""

    name: str
    queues: list[str]
    slots: int
    running: dict[str, int] = field(default_factory=dict)   # queue -> runs it claimed and runs
    reserved: dict[str, int] = field(default_factory=dict)  # queue -> messages it fetched and has not started
    last_beat_age: float = 0.0  # seconds since its heartbeat
    draining: bool = False  # stopping: it takes no more runs, and finishes those it holds


@dataclass(frozen=True)
class QueueDemand:
    """One worker queue's demand, and the workers it needs."""

    queued: int
    reserved: int
    running: int
    slots_per_worker: int
    workers: int
    desired_workers: int


@dataclass(frozen=True)
class PoolState:
    """The whole pool at one moment: each queue's demand and each live worker."""

    queues: dict[str, QueueDemand]
    workers: list[WorkerReport]
    at: float

    def to_dict(self) -> dict[str, Any]:
        """As GET /api/v1/pool answers it."""
        return {"queues": {name: asdict(demand) for name, demand in self.queues.items()},
                "workers": [asdict(worker) for worker in self.workers], "at": self.at}


def desired_workers(queued: int, reserved: int, running: int, slots_per_worker: int) -> int:
    """Workers that hold every run waiting, fetched or going, each with ``slots_per_worker`` slots (0 for none)."""
    demand = max(0, queued) + max(0, reserved) + max(0, running)
    return math.ceil(demand / max(1, slots_per_worker))


def queue_demand(names: Iterable[str], queued: Mapping[str, int], workers: Iterable[WorkerReport],
                 default_slots: int) -> dict[str, QueueDemand]:
    """Each queue of ``names`` (and of ``workers``) with its demand, sorted by name with ``default`` first.

    ``slots_per_worker`` is the largest slot count of the live workers serving
    the queue, else ``default_slots`` (FLOWPOOL_WORKER_CONCURRENCY, what a
    worker started from zero will have): a queue no worker serves yet still
    asks for one as soon as a run waits on it.
    """
    workers = list(workers)
    every = set(names) | {queue for worker in workers for queue in worker.queues}
    ordered = sorted(every, key=lambda name: (name != DEFAULT_QUEUE, name))
    result: dict[str, QueueDemand] = {}
    for name in ordered:
        # A draining worker serves no queue any more; what it still runs counts below all the same.
        serving = [worker for worker in workers if name in worker.queues and not worker.draining]
        slots = max((worker.slots for worker in serving), default=default_slots)
        reserved = sum(worker.reserved.get(name, 0) for worker in workers)
        running = sum(worker.running.get(name, 0) for worker in workers)
        waiting = queued.get(name, 0)
        result[name] = QueueDemand(queued=waiting, reserved=reserved, running=running, slots_per_worker=slots,
                                   workers=len(serving),
                                   desired_workers=desired_workers(waiting, reserved, running, slots))
    return result


def _counts(value: object) -> dict[str, int]:
    """A report's ``{queue: n}``, with anything else in it left out."""
    if not isinstance(value, dict):
        return {}
    return {str(q): int(n) for q, n in value.items() if isinstance(n, int) and not isinstance(n, bool) and n > 0}


def parse_report(name: str, raw: bytes | None, age: float, default_slots: int) -> WorkerReport:
    """A worker's report as its heartbeat wrote it; a live worker without one (an older release) serves default."""
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    queues = [q for q in data.get("queues") or [DEFAULT_QUEUE] if is_queue_name(q)]
    slots = data.get("slots")
    return WorkerReport(name=name, queues=queues,
                        slots=slots if isinstance(slots, int) and slots > 0 else default_slots,
                        running=_counts(data.get("running")), reserved=_counts(data.get("reserved")),
                        last_beat_age=round(max(0.0, age), 3), draining=data.get("draining") is True)


def live_queue_workers(client: redis.Redis, queue: str, ttl: float) -> list[str]:
    """Names of the live workers consuming ``queue``: a heartbeat within ``ttl`` seconds in ``keys.queue_workers``.

    For the default queue, while none is there, a live worker of a release
    before worker queues counts too (its time in WORKERS, with no report in
    WORKER_POOL): it takes the default queue's runs, as during a rolling upgrade.
    """
    since = time.time() - ttl
    names = client.zrangebyscore(keys.queue_workers(queue), since, "+inf")
    if not names and queue == DEFAULT_QUEUE:
        live = client.zrangebyscore(keys.WORKERS, since, "+inf")
        if live:
            names = [name for name, report in zip(live, client.hmget(keys.WORKER_POOL, live)) if report is None]
    return [name.decode() for name in names]


class PoolReader:
    """Reads the pool's state from the registry's Redis and the broker."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        scheme = settings.broker.partition("://")[0].lower()
        self._broker_redis: redis.Redis | None = None
        if settings.broker == settings.redis:
            self._broker_redis = client
        elif scheme in ("redis", "rediss"):
            # A broker Redis of its own (FLOWPOOL_BROKER_URL): the queues' lists live there.
            self._broker_redis = connect_redis(settings, settings.broker)

    def read(self, workers: list[WorkerReport] | None = None) -> PoolState:
        """The pool now: the live workers' reports (``workers``, when read already) and every known queue's length,
        in two round trips."""
        now = time.time()
        if workers is None:
            workers = self.read_workers(now)
        # Queues a workflow names but no worker serves are left out: their runs are refused at once (unless
        # autoscaled), so nothing waits in them, and their names are any account's to make up.
        names = {DEFAULT_QUEUE} | self.settings.autoscaled_queue_names
        names |= {queue for worker in workers for queue in worker.queues}
        queued = self.queue_lengths(sorted(names))
        return PoolState(queues=queue_demand(names, queued, workers, self.settings.worker_concurrency),
                         workers=workers, at=round(now, 3))

    def read_workers(self, now: float) -> list[WorkerReport]:
        """The live workers' reports, by name (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(keys.WORKERS, now - self.settings.worker_ttl_seconds, "+inf", withscores=True)
        pipe.hgetall(keys.WORKER_POOL)
        live, reports = pipe.execute()
        # A report of a worker whose heartbeat is older than the TTL is a dead worker's last word: left out.
        workers = [parse_report(raw_name.decode(), reports.get(raw_name), now - beat, self.settings.worker_concurrency)
                   for raw_name, beat in live]
        return sorted(workers, key=lambda w: w.name)

    def queue_lengths(self, names: list[str]) -> dict[str, int]:
        """Runs waiting in each queue's broker queue; an Unavailable when the broker does not answer.

        On a Redis broker a queue is one list per priority lane (fair share,
        flowpool.publish): every lane's runs wait, so all of them count.
        """
        if self._broker_redis is not None:
            pipe = self._broker_redis.pipeline(transaction=False)
            for name in names:
                for lane in LANES:
                    pipe.llen(lane_list(broker_queue(name), lane))
            # Redis errors go to the API's handler (503 when unreachable), as for every other read.
            lengths = [int(n) for n in pipe.execute()]
            return {name: sum(lengths[i * len(LANES):(i + 1) * len(LANES)]) for i, name in enumerate(names)}
        return declared_lengths(self.settings.broker, names)


def declared_lengths(broker_url: str, names: list[str]) -> dict[str, int]:
    """Message counts of the queues' broker queues by passive declares (amqp); a queue not declared yet holds 0."""
    from kombu import Connection
    from kombu.exceptions import OperationalError

    lengths = dict.fromkeys(names, 0)
    connection = Connection(broker_url, connect_timeout=2)
    try:
        channel = connection.channel()
        try:
            for name in names:
                try:
                    lengths[name] = int(channel.queue_declare(queue=broker_queue(name), passive=True)[1])
                except connection.channel_errors:
                    # Not declared yet: no worker consumed it and no run was sent to it. The broker closed the
                    # channel over the refusal, so the next queue asks on a fresh one.
                    _close_quietly(channel)
                    channel = connection.channel()
        finally:
            _close_quietly(channel)
    except (OperationalError, *connection.connection_errors) as exc:
        raise Unavailable(f"the broker is unreachable: {exc}") from exc
    finally:
        connection.release()
    return lengths


def _close_quietly(channel: Any) -> None:
    try:
        channel.close()
    except Exception:  # closing a channel the broker already closed: nothing left to release
        pass
