"""A run's webhook: where its end is POSTed, signed with its account's secret, retried with backoff.

A request with a ``webhook_url`` gets one webhook, stored beside its run
record (``keys.run_webhook``) before the run is queued. The run's end, written
by its worker or by whoever ends it as lost or expired (``run_scripts``),
makes the webhook due (``keys.WEBHOOKS_DUE``); the workers deliver what is due.
"""
from __future__ import annotations

import time

import redis

from flowpool import keys

__all__ = ["WebhookStore"]


class WebhookStore:
    """Webhooks of runs, in the registry's Redis."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.redis = client
        self.ttl_seconds = ttl_seconds  # as long as the run record

    def prepare(self, request_id: str, account_id: str, url: str) -> None:
        """Store the webhook of a run about to be admitted: pending until the run ends."""
        key = keys.run_webhook(request_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"url": url, "account": account_id, "status": "pending", "attempts": "[]",
                                "created_at": time.time()})
        pipe.expire(key, self.ttl_seconds)
        pipe.execute()

    def discard(self, request_id: str) -> None:
        """Forget the webhook of a request that was not admitted (refused, or a replay of an earlier run)."""
        self.redis.delete(keys.run_webhook(request_id))

    def due_now(self, request_id: str) -> None:
        """Make the webhook of a run that has ended already (a cache hit) due at once."""
        self.redis.zadd(keys.WEBHOOKS_DUE, {request_id: time.time()})
