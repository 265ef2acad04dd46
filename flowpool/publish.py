"""Sending a run's task to the workers: Celery builds the message; on a Redis broker one held client pushes it.

``celery.send_task`` builds the task message (Celery's protocol 2: headers,
routing, ``expires``, ``argsrepr``/``kwargsrepr``) and hands it to a kombu
producer. kombu's Redis transport then makes a new Redis client, copies and
binds the queue and exchange, and declares the queue, on every message: about a
seventh of an API process's CPU per run. :class:`RunSender` passes Celery a
producer of its own that does what that transport does with the message (the
same envelope, base64 body, ``LPUSH`` onto the queue's list) through one
client held for the process, so Celery workers take it as any other.

A message with a priority goes where kombu's Redis transport puts it: the
transport keeps one list per priority step (``queue`` for step 0, ``queue``
+ ``"\x06\x16"`` + the step for the others) and its workers pop the lists in
step order, 0 first. Fair share (flowpool.run_scripts' BEGIN picks the lane,
``api.admission.submit`` sends with it) rests on that order.

Anything this producer does not do as kombu does (another broker, task
events that Flower reads, a key prefix, compression) goes through Celery's
own producers, unchanged.
"""
from __future__ import annotations

import base64
import json
import uuid
from bisect import bisect
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import Connection
from kombu.entity import maybe_delivery_mode
from kombu.serialization import dumps as serialize
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

from .connections import UNREACHABLE, connect_redis
from .settings import Settings

__all__ = ["LANES", "RunSender", "lane_list"]

# The priority steps of kombu's Redis transport (tasks/app.py sets none of its own): the lanes fair share uses.
LANES = tuple(PRIORITY_STEPS)

# kombu's Redis transport waits this long for an answer (tasks/app.py, broker_transport_options).
_BROKER_SOCKET_SECONDS = 10.0


class RunSender:
    """Send tasks by name through Celery, and on a plain Redis broker through one Redis client held here."""

    def __init__(self, celery: Celery, settings: Settings) -> None:
        self.celery = celery
        self._producer: _RedisProducer | None = None
        conf = celery.conf
        # kombu's Redis transport (redis://, rediss://, sentinel://...) keeps a list per priority step; amqp
        # queues are declared without x-max-priority, so there a priority would do nothing.
        self.lanes = Connection(settings.broker).transport.driver_type == "redis"
        # redis:// only: kombu's other Redis URLs (rediss:// with broker_use_ssl, redis+socket://, sentinel://) are
        # connected as kombu connects them.
        plain_redis = (urlsplit(settings.broker).scheme == "redis"
                       and not (conf.broker_transport_options or {}).get("global_keyprefix"))
        if plain_redis and not conf.task_send_sent_event:  # a task-sent event goes through kombu's producers
            self._producer = _RedisProducer(celery, connect_redis(settings, settings.broker, _BROKER_SOCKET_SECONDS))

    @property
    def held(self) -> bool:
        """Whether runs go through the Redis client held here (else through Celery's producers)."""
        return self._producer is not None

    def send(self, name: str, **options: Any) -> None:
        """``celery.send_task(name, **options)``, published through the held client where it can be."""
        self.celery.send_task(name, producer=self._producer, **options)


class _RedisProducer:
    """The part of a kombu ``Producer`` that ``celery.send_task`` uses, for kombu's Redis transport."""

    def __init__(self, celery: Celery, client: redis.Redis) -> None:
        self.celery = celery
        self.client = client
        self.connection = _Connection()

    def publish(self, body: Any, routing_key: str | None = None, delivery_mode: Any = None, priority: int | None = 0,
                serializer: str | None = None, headers: dict[str, Any] | None = None, compression: str | None = None,
                exchange: Any = None, retry: bool = False, retry_policy: dict[str, Any] | None = None,
                declare: Any = None, expiration: float | None = None, timeout: float | None = None,
                confirm_timeout: float | None = None, **properties: Any) -> None:
        """Push the message onto its queue's list (its priority's lane), as kombu's Redis channel does for the
        default exchange."""
        if exchange or compression or not routing_key:
            # A message kombu would route or compress: left to it.
            with self.celery.producer_or_acquire() as producer:
                producer.publish(body, routing_key=routing_key, delivery_mode=delivery_mode, priority=priority,
                                 serializer=serializer, headers=headers, compression=compression, exchange=exchange,
                                 retry=retry, retry_policy=retry_policy, declare=declare, expiration=expiration,
                                 timeout=timeout, confirm_timeout=confirm_timeout, **properties)
            return
        content_type, content_encoding, data = serialize(body, serializer=serializer or "json")
        if isinstance(data, str):
            data = data.encode(content_encoding or "utf-8")
        properties["delivery_mode"] = maybe_delivery_mode(delivery_mode)
        if expiration is not None:
            properties["expiration"] = str(int(expiration * 1000))
        priority = priority or 0  # kombu's default priority
        properties.update(priority=priority, delivery_info={"exchange": "", "routing_key": routing_key},
                          body_encoding="base64", delivery_tag=str(uuid.uuid4()))
        message = json.dumps({"body": base64.b64encode(data).decode(), "content-encoding": content_encoding,
                              "content-type": content_type, "headers": headers or {}, "properties": properties})
        # As kombu's publish retry policy does (tasks/app.py): once more on a connection that failed.
        tries = 2 if retry else 1
        for attempt in range(tries):
            try:
                self.client.lpush(lane_list(routing_key, priority), message)
                return
            except UNREACHABLE:
                if attempt == tries - 1:
                    raise


def lane_list(queue: str, priority: object) -> str:
    """The list kombu's Redis transport keeps ``queue``'s messages of ``priority`` in (its ``_q_for_pri``).

    The priority is bounded to 0-9 and taken down to its step: 0 is the
    queue's own list, any other step ``queue`` + ``"\x06\x16"`` + the step.
    """
    try:
        value = min(max(int(priority), 0), 9)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        value = 0
    step = LANES[bisect(LANES, value) - 1]
    return f"{queue}{RedisChannel.sep}{step}" if step else queue


class _Connection:
    """What ``celery.send_task`` asks of a producer's connection: errors are left as they are."""

    @contextmanager
    def _reraise_as_library_errors(self) -> Iterator[None]:
        yield
