"""Connections every flowpool process opens: the Redis client the API, the workers and the CLI share.

A Redis that stops answering for a while (restarted, paused, failed over)
should cost a run nothing: :func:`patiently` tries a call again until a
deadline, so the parts that hold a run's outcome ride out a short outage.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

import redis

from .settings import Settings

__all__ = ["UNREACHABLE", "connect_cache_store", "connect_redis", "patiently"]

log = logging.getLogger("flowpool.redis")

T = TypeVar("T")

# What a Redis that is down (refused, reset) or paused (no answer within the socket timeout) raises.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


def connect_redis(settings: Settings, url: str | None = None) -> redis.Redis:
    """The Redis client every flowpool process uses (fails fast when Redis is away, never waits forever).

    ``url`` names another Redis than the registry's, with the same client settings.
    """
    return redis.Redis.from_url(url or settings.redis, socket_connect_timeout=2, socket_keepalive=True,
                                socket_timeout=settings.redis_socket_timeout_seconds,
                                health_check_interval=30, max_connections=1024)


def connect_cache_store(settings: Settings) -> redis.Redis | None:
    """The Redis of its own the result cache lives in (``FLOWPOOL_CACHE_REDIS_URL``); None: the registry's."""
    return connect_redis(settings, settings.cache_redis_url) if settings.cache_redis_url else None


def patiently(call: Callable[[], T], until: float, what: str) -> T:
    """``call()``, tried again with a growing pause while Redis is unreachable, until ``time.monotonic()`` passes
    ``until``; then the last error is raised. ``what`` names the call in the log."""
    pause = 0.05
    failed_since: float | None = None
    while True:
        try:
            result = call()
        except UNREACHABLE as exc:
            now = time.monotonic()
            if failed_since is None:
                failed_since = now
                log.warning("%s: Redis is unreachable (%s); trying again for up to %.0fs", what, exc, until - now)
            if now + pause > until:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
            continue
        if failed_since is not None:
            log.warning("%s: Redis answered again after %.1fs", what, time.monotonic() - failed_since)
        return result
