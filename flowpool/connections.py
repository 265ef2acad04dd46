"""Connections every flowpool process opens: the Redis client the API, the workers and the CLI share."""
from __future__ import annotations

import redis

from .settings import Settings

__all__ = ["connect_redis"]


def connect_redis(settings: Settings) -> redis.Redis:
    """The Redis client every flowpool process uses (fails fast when Redis is away)."""
    return redis.Redis.from_url(settings.redis, socket_connect_timeout=2, socket_keepalive=True,
                                health_check_interval=30, max_connections=1024)
