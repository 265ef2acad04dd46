"""Per-account quotas and fair share at admission, and what a run's end adds to its account's usage.

Admission checks an account's limits (flowpool.limits: concurrency, rpm,
tokens_per_day, compute_seconds_per_day) inside the one Lua script that
starts a run (``run_scripts`` BEGIN), so they hold across every API process
and host with no extra round trip. This module builds what that script needs
(:class:`Quota`), turns its refusal into the 429 (:func:`refusal`), and builds
what a run's end adds to the account's usage (:func:`token_increments`,
:func:`end_args`).

The lane of a queued run (fair share): the workers' slots of its queue are
shared between the accounts with runs in flight (``keys.ACTIVE_ACCOUNTS``);
an account's runs within its share go to lane 0, those within 4 shares to
lane 3, within 16 shares to lane 6, the rest to lane 9; while the queue's
slots are unknown the share is 1. Workers take lane 0 first
(flowpool.publish), so a quiet account's run never waits behind a busy one's
backlog.

A run's concurrency slot lapses by itself when its end is never written:
queued, once its claim can no longer come (the broker drops it unclaimed at
the queue wait, a worker that took it just before retries its claim through
a Redis outage for up to FLOWPOOL_REDIS_OUTAGE_SECONDS, and
``SLOT_MARGIN_SECONDS`` more), so a late claim never finds its slot gone and
given to another run; claimed, with its worker's lease (CLAIM, and the
heartbeat that renews both, tasks/worker.py). Slots are scored and pruned on
Redis's clock, whatever the clocks of the API processes and workers say.
"""
from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import astuple, dataclass
from typing import Any, Iterable, Sequence

from flowpool import keys
from flowpool.errors import QuotaExceeded
from flowpool.limits import Limits
from flowpool.settings import Settings
from flowpool.usage import day_of

__all__ = ["NO_QUOTA_ARGS", "NO_QUOTA_KEYS", "SLOT_MARGIN_SECONDS", "Quota", "end_args", "end_keys", "key_parts",
           "refusal", "seconds_to_midnight", "slot_args", "token_increments"]

# How long past the queue wait and the Redis outage a queued run's slot is kept: the broker drops the message at
# the queue wait, and a worker that took it just before claims it within moments, or retries the claim for up to
# the outage (CLAIM then scores the slot by its lease).
SLOT_MARGIN_SECONDS = 5.0


def key_parts(key_of: Any) -> tuple[str, str]:
    """A per-account key function split around the account id, for a Lua script that knows the account only
    from the run record: ``head .. account .. tail`` is the key."""
    head, _, tail = key_of("\0").partition("\0")
    return head, tail


@dataclass(frozen=True)
class Quota:
    """What BEGIN needs to check one account's limits and pick a queued run's lane."""

    account_id: str
    ref: str  # the workflow's ref: its cache hits are counted under it too
    defaults: tuple[int, int, int, int]  # concurrency, rpm, tokens_per_day, compute_seconds_per_day; 0 = none
    queue_slots: int  # the live workers' slots of the run's queue; 0 when unknown
    fair_share: bool
    slot_seconds: float  # how long a queued run's slot is kept unclaimed: the queue wait, the outage, a margin
    usage_ttl_seconds: int
    day: str  # today (UTC), as usage keys name it

    @classmethod
    def for_request(cls, settings: Settings, account_id: str, ref: str, queue_slots: int) -> Quota:
        """The quota of a request to ``ref`` by ``account_id``, with the settings' defaults."""
        return cls(account_id=account_id, ref=ref,
                   defaults=astuple(Limits.defaults(settings)),  # in BEGIN's order, as Limits names them
                   queue_slots=queue_slots, fair_share=settings.fair_share,
                   slot_seconds=settings.queue_wait_seconds + settings.redis_outage_seconds + SLOT_MARGIN_SECONDS,
                   usage_ttl_seconds=settings.usage_retention_days * 86400,
                   day=day_of(time.time()))

    def keys(self) -> list[str]:
        """BEGIN's quota keys, in its order (KEYS 11-15)."""
        account = self.account_id
        return [keys.account_limits(account), keys.account_slots(account), keys.account_rate(account),
                keys.account_usage(account, self.day), keys.ACTIVE_ACCOUNTS]

    def args(self, ended: bool) -> list[Any]:
        """BEGIN's quota arguments, in its order (ARGV 11-21); ``ended``: the record written is a cache hit's,
        already ended (no run to queue, no slot to take)."""
        return [self.account_id, self.ref, *self.defaults, self.queue_slots, int(self.fair_share),
                self.slot_seconds, self.usage_ttl_seconds, int(ended)]


# BEGIN's arguments without a quota (nothing checked, no slot taken, no lane picked): a store used alone.
NO_QUOTA_KEYS = [""] * 5
NO_QUOTA_ARGS = [""] * 11


def seconds_to_midnight(now: float | None = None) -> int:
    """Whole seconds until the next UTC midnight, when the daily budgets start again (at least 1)."""
    moment = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc)
    midnight = (moment + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - moment).total_seconds()))


def refusal(reply: Sequence[Any]) -> QuotaExceeded:
    """The 429 of BEGIN's refusal ``['quota', limit, used, allowed, wait_ms]``."""
    limit = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
    used, allowed, wait_ms = int(reply[2]), int(reply[3]), int(reply[4])
    if limit == "rpm":
        retry_after = max(1, math.ceil(wait_ms / 1000))
        message = (f"account is over its rate limit: {used} of {allowed} requests per minute; "
                   f"the next is allowed in {retry_after}s")
    elif limit == "concurrency":
        retry_after = 1
        message = f"account is at its concurrency limit: {used} of {allowed} runs queued or running"
    else:
        retry_after = seconds_to_midnight()
        what = "tokens" if limit == "tokens_per_day" else "compute seconds"
        message = (f"account has used its daily {limit} budget: {used} of {allowed} {what} today (UTC); "
                   "the budget starts again at midnight UTC")
    return QuotaExceeded(message, retry_after=retry_after, limit=limit, used=used, allowed=allowed)


def token_increments(records: Iterable[dict[str, Any]]) -> list[tuple[str, int]]:
    """What a run's model calls add to its account's usage (flowpool.usage): tokens, prompt and completion
    tokens, and tokens by model; nothing for a run without calls."""
    totals: dict[str, int] = {}
    for record in records:
        for field, name in (("tokens", "total_tokens"), ("prompt_tokens", "prompt_tokens"),
                            ("completion_tokens", "completion_tokens")):
            totals[field] = totals.get(field, 0) + int(record.get(name) or 0)
        model = record.get("model")
        if model and record.get("total_tokens"):
            field = f"model_tokens:{model}"
            totals[field] = totals.get(field, 0) + int(record["total_tokens"])
    return [(field, amount) for field, amount in totals.items() if amount]


_SLOTS = key_parts(keys.account_slots)


def end_keys(request_id: str) -> list[str]:
    """The keys FINISH and ABANDON add to a run's own, in their order: the active accounts (fair share), the due
    webhooks, and the run's webhook."""
    return [keys.ACTIVE_ACCOUNTS, keys.WEBHOOKS_DUE, keys.run_webhook(request_id)]


def slot_args() -> list[str]:
    """What CLAIM needs to score a run's slot by its lease knowing its account only from the run record: the
    slots key's parts."""
    return list(_SLOTS)


def end_args(day: str, retention_seconds: int, hard_grace_seconds: float = 0.0) -> list[Any]:
    """The arguments FINISH and ABANDON need to release a run's slot and count its usage knowing its account
    only from the run record: the slots key's parts, the usage key's parts for ``day`` (the UTC day of the
    end), how long usage is kept, and the hard grace past a run's time limit (its compute is capped at
    both)."""
    usage_head, usage_tail = key_parts(lambda account: keys.account_usage(account, day))
    return [*_SLOTS, usage_head, usage_tail, retention_seconds, hard_grace_seconds]
