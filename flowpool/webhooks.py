"""A run's webhook: where its end is POSTed, signed with its account's secret, retried with backoff.

A request with a ``webhook_url`` gets one webhook, stored beside its run
record (``keys.run_webhook``) before the run is queued. The run's end, written
by its worker or by whoever ends it as lost or expired (``run_scripts``),
makes the webhook due (``keys.WEBHOOKS_DUE``); the workers deliver what is due
(``tasks/webhooks.py``).

A webhook's hash holds ``url``, ``account``, ``status`` (``pending`` until it
is ``delivered``, ``failed`` or ``refused``), ``attempts`` (a JSON list of
``{at, status_code | error, ms}``, the latest :data:`MAX_ATTEMPTS_KEPT`),
``tries`` (attempts made), ``created_at``, ``first_at`` (its first attempt)
and ``next_at`` (its next one, while a retry is scheduled).

Claiming is a lease: a deliverer takes a due webhook by moving its due score
past the time one delivery can take (:meth:`WebhookStore.claim`), so another
deliverer skips it meanwhile, and takes it again only if the first never
recorded an outcome (its worker died): delivery is at least once, and the
``X-Flowpool-Webhook-Id`` header lets a receiver drop a repeat.

Claiming is fair between accounts: a claim looks at the oldest
:data:`CLAIM_WINDOW` due webhooks, takes at most one of each account, and
serves the accounts round robin (each store remembers the last account it
served and starts after it), not oldest first. So one account's flood of
webhooks to a receiver that answers slowly holds at most its turn of the
delivery threads, and another account's webhook waits for a free thread, not
for the flood, as long as one of its webhooks is among the oldest
:data:`CLAIM_WINDOW` due: behind a flood larger than that, it waits until the
flood's oldest are taken.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from flowpool import keys
from flowpool.quotas import key_parts

__all__ = ["CLAIM_WINDOW", "MAX_ATTEMPTS_KEPT", "Webhook", "WebhookStore", "next_attempt_at"]

Outcome = Literal["pending", "delivered", "failed", "refused"]

# The attempts a webhook's record keeps, the latest ones (its `tries` counts them all).
MAX_ATTEMPTS_KEPT = 50
# The longest wait between two attempts, before jitter.
MAX_BACKOFF_SECONDS = 300.0
# The oldest due webhooks a claim looks at to pick one of each account.
CLAIM_WINDOW = 200
# A webhook's key around its request id, for the claim's script, which builds the keys of the ids it reads.
_HOOK_KEY = key_parts(keys.run_webhook)

# Take up to `limit` webhooks due by `now`, at most one of each account, each leased until `lease_until` (its due
# score moved there). Of the oldest `window` due, the oldest of each account is a candidate (the account read from
# the webhook's hash, its key the prefix, the id and the suffix; a webhook gone is a candidate on its own, to be
# dropped); the accounts are taken in the order of their ids, starting after `after` (the account the caller
# served last) and wrapping around: round robin. Returns the ids and the last account taken ('' when none).
_CLAIM = """
local due_key = KEYS[1]
local now, lease_until, limit, window = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local hook_prefix, hook_suffix, after = ARGV[5], ARGV[6], ARGV[7]
local ids = redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'LIMIT', 0, window)
local oldest, accounts = {}, {}
for _, id in ipairs(ids) do
  local account = redis.call('HGET', hook_prefix .. id .. hook_suffix, 'account')
  if not account or account == '' then account = '~gone:' .. id end  -- no account id (hex) looks like it
  if oldest[account] == nil then
    oldest[account] = id
    table.insert(accounts, account)
  end
end
table.sort(accounts)
local start = 1
for i, account in ipairs(accounts) do
  if account > after then start = i break end
end
local taken, last = {}, ''
for n = 0, math.min(limit, #accounts) - 1 do
  local account = accounts[(start - 1 + n) % #accounts + 1]
  redis.call('ZADD', due_key, lease_until, oldest[account])
  table.insert(taken, oldest[account])
  last = account
end
return {taken, last}
"""

# Record one attempt of a pending webhook and what follows it: another at `next_at` (outcome pending), or its
# final status. A webhook no longer pending (recorded by another deliverer) or gone (expired) only leaves the
# due set; returns 0 then, else 1.
_RECORD = """
local hook_key, due_key = KEYS[1], KEYS[2]
local request_id, attempt_json, outcome, next_at, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local keep = tonumber(ARGV[6])
if redis.call('HGET', hook_key, 'status') ~= 'pending' then
  redis.call('ZREM', due_key, request_id)
  return 0
end
local attempts = cjson.decode(redis.call('HGET', hook_key, 'attempts') or '[]')
table.insert(attempts, cjson.decode(attempt_json))
while #attempts > keep do table.remove(attempts, 1) end
redis.call('HSET', hook_key, 'attempts', cjson.encode(attempts))
redis.call('HINCRBY', hook_key, 'tries', 1)
redis.call('HSETNX', hook_key, 'first_at', now)
if outcome == 'pending' then
  redis.call('HSET', hook_key, 'next_at', next_at)
  redis.call('ZADD', due_key, next_at, request_id)
else
  redis.call('HSET', hook_key, 'status', outcome)
  redis.call('HDEL', hook_key, 'next_at')
  redis.call('ZREM', due_key, request_id)
end
return 1
"""


def next_attempt_at(tries: int, first_at: float, now: float, retry_seconds: float,
                    jitter: float | None = None) -> float | None:
    """When to try again after ``tries`` failed attempts, the first at ``first_at``; None: give up (failed).

    Waits 1 s, 2 s, 4 s ... up to :data:`MAX_BACKOFF_SECONDS`, each plus up to
    a quarter more (``jitter`` in [0, 1), random when None) so that webhooks
    failing together do not come back together; never past ``retry_seconds``
    after the first attempt, where one last attempt is made.
    """
    give_up_at = first_at + retry_seconds
    if now >= give_up_at:
        return None
    wait = min(MAX_BACKOFF_SECONDS, 2.0 ** max(0, tries - 1))
    wait *= 1 + 0.25 * (random.random() if jitter is None else jitter)
    return min(now + wait, give_up_at)


@dataclass(frozen=True)
class Webhook:
    """One run's webhook, as stored."""

    request_id: str
    url: str
    account: str
    status: str
    attempts: list[dict[str, Any]] = field(default_factory=list)
    tries: int = 0
    first_at: float | None = None
    next_at: float | None = None

    @classmethod
    def from_fields(cls, request_id: str, raw: dict[bytes, bytes]) -> Webhook | None:
        values = {k.decode(): v.decode() for k, v in raw.items()}
        if "url" not in values:
            return None
        return cls(request_id=request_id, url=values["url"], account=values.get("account", ""),
                   status=values.get("status", "pending"), attempts=json.loads(values.get("attempts") or "[]"),
                   tries=int(values.get("tries") or 0),
                   first_at=float(values["first_at"]) if values.get("first_at") else None,
                   next_at=float(values["next_at"]) if values.get("next_at") else None)

    def to_view(self) -> dict[str, Any]:
        """As GET /api/v1/runs/{id} shows it (under ``webhook``)."""
        return {"url": self.url, "status": self.status, "attempts": self.attempts,
                "next_attempt_at": self.next_at if self.status == "pending" else None}


class WebhookStore:
    """Webhooks of runs, in the registry's Redis."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.redis = client
        self.ttl_seconds = ttl_seconds  # as long as the run record
        self._claim = client.register_script(_CLAIM)
        self._record = client.register_script(_RECORD)
        # The account whose webhook this store claimed last: the next claim starts after it (round robin).
        self.turn = ""

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

    def get(self, request_id: str) -> Webhook | None:
        """The run's webhook, or None when it has none (or it expired)."""
        return Webhook.from_fields(request_id, self.redis.hgetall(keys.run_webhook(request_id)))

    def view(self, request_id: str) -> dict[str, Any] | None:
        """The run's webhook as the API shows it, or None."""
        webhook = self.get(request_id)
        return webhook.to_view() if webhook is not None else None

    # Delivery (the workers)

    def claim(self, lease_seconds: float, limit: int = 1, now: float | None = None) -> list[str]:
        """Request ids of up to ``limit`` webhooks due now, at most one of each account, the accounts round robin;
        each leased to the caller for ``lease_seconds``."""
        now = time.time() if now is None else now
        hook_prefix, hook_suffix = _HOOK_KEY
        ids, last = self._claim(keys=[keys.WEBHOOKS_DUE], args=[
            repr(now), repr(now + lease_seconds), limit, CLAIM_WINDOW, hook_prefix, hook_suffix, self.turn])
        if ids:
            self.turn = last.decode()
        return [i.decode() for i in ids]

    def defer(self, request_id: str, at: float) -> None:
        """Make a claimed webhook due again at ``at`` without an attempt (its run has not ended yet)."""
        self.redis.zadd(keys.WEBHOOKS_DUE, {request_id: at}, xx=True)

    def drop(self, request_id: str) -> None:
        """Take a webhook out of the due set (it is gone: expired with its run)."""
        self.redis.zrem(keys.WEBHOOKS_DUE, request_id)

    def record(self, request_id: str, attempt: dict[str, Any], outcome: Outcome, next_at: float | None = None,
               now: float | None = None) -> bool:
        """Record an attempt and its outcome (``pending``: try again at ``next_at``); False when the webhook was
        no longer pending (another deliverer recorded its end) or is gone."""
        if outcome == "pending" and next_at is None:
            raise ValueError("a webhook tried again needs next_at")
        now = time.time() if now is None else now
        return bool(self._record(
            keys=[keys.run_webhook(request_id), keys.WEBHOOKS_DUE],
            args=[request_id, json.dumps(attempt, separators=(",", ":")), outcome,
                  repr(next_at) if next_at is not None else "", repr(now), MAX_ATTEMPTS_KEPT]))
