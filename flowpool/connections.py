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

__all__ = ["QUICK_SECONDS", "UNREACHABLE", "connect_cache_store", "connect_redis", "patiently"]

log = logging.getLogger("flowpool.redis")

T = TypeVar("T")

# What a Redis that is down (refused, reset) or paused (no answer within the socket timeout) raises.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


def connect_redis(settings: Settings, url: str | None = None, socket_timeout: float | None = None) -> redis.Redis:
    """The Redis client every flowpool process uses (fails fast when Redis is away, never waits forever).

    ``url`` names another Redis than the registry's; ``socket_timeout`` a
    shorter wait for an answer than FLOWPOOL_REDIS_SOCKET_TIMEOUT_SECONDS,
    for calls that must not hold up what waits on them.
    """
    return redis.Redis.from_url(url or settings.redis, socket_connect_timeout=min(2.0, socket_timeout or 2.0),
                                socket_keepalive=True,
                                socket_timeout=socket_timeout or settings.redis_socket_timeout_seconds,
                                health_check_interval=30, max_connections=1024)


# How long a call waits for an answer where waiting would hold up more than the call: a run's chunk writes (its
# supervisor waits), a cache of its own (every request waits; a cache that is away must cost hits, not a stall).
QUICK_SECONDS = 1.0


def connect_cache_store(settings: Settings) -> redis.Redis | None:
    """The Redis of its own the result cache lives in (``FLOWPOOL_CACHE_REDIS_URL``); None: the registry's."""
    if not settings.cache_redis_url:
        return None
    return connect_redis(settings, settings.cache_redis_url, socket_timeout=QUICK_SECONDS)


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
