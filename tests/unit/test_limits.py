"""Accounts' limits (flowpool.limits) and webhook secrets (registry Accounts), against the session's real Redis."""
from __future__ import annotations

import uuid

import pytest
import redis

from flowpool import keys
from flowpool.limits import LIMIT_NAMES, MAX_LIMIT, Limits, LimitStore
from flowpool.registry import Accounts
from flowpool.settings import Settings


def _store(client: redis.Redis, **defaults: int) -> LimitStore:
    return LimitStore(client, Settings(**{f"default_{name}": value for name, value in defaults.items()}))


def test_an_account_without_limits_of_its_own_takes_every_default(redis_db: redis.Redis) -> None:
    store = _store(redis_db, concurrency=4, rpm=120, tokens_per_day=0, compute_seconds_per_day=3600)
    limits, own = store.get("acct-1")
    assert limits == Limits(concurrency=4, rpm=120, tokens_per_day=0, compute_seconds_per_day=3600)
    assert own == frozenset()
    assert LIMIT_NAMES == ("concurrency", "rpm", "tokens_per_day", "compute_seconds_per_day")


def test_set_gives_the_account_its_own_values_and_leaves_the_others_alone(redis_db: redis.Redis) -> None:
    store = _store(redis_db, concurrency=4, rpm=120)
    limits, own = store.set("acct-1", concurrency=1, tokens_per_day=0)
    assert limits == Limits(concurrency=1, rpm=120, tokens_per_day=0, compute_seconds_per_day=0)
    assert own == {"concurrency", "tokens_per_day"}  # an own 0 (no limit) is still the account's own value
    # Stored as BEGIN reads them: integers in the account's limits hash, one field per limit it has its own.
    assert redis_db.hgetall(keys.account_limits("acct-1")) == {b"concurrency": b"1", b"tokens_per_day": b"0"}
    assert store.get("acct-2") == (Limits(concurrency=4, rpm=120), frozenset())  # another account is untouched

    limits, own = store.set("acct-1", rpm=7)
    assert (limits.concurrency, limits.rpm, own) == (1, 7, {"concurrency", "rpm", "tokens_per_day"})


def test_none_puts_a_limit_back_to_the_default_which_follows_the_setting(redis_db: redis.Redis) -> None:
    _store(redis_db, concurrency=4).set("acct-1", concurrency=2, rpm=30)
    limits, own = _store(redis_db, concurrency=4).set("acct-1", concurrency=None)
    assert (limits.concurrency, limits.rpm, own) == (4, 30, {"rpm"})
    # A default changed later reaches the account, as it has no value of its own any more.
    assert _store(redis_db, concurrency=9).get("acct-1")[0].concurrency == 9

    _store(redis_db).set("acct-1", rpm=None)
    assert not redis_db.exists(keys.account_limits("acct-1"))  # nothing of its own left: no hash


@pytest.mark.parametrize("values", [{"concurrency": -1}, {"rpm": 2.5}, {"rpm": "3"}, {"rpm": True},
                                    {"tokens_per_day": MAX_LIMIT + 1}, {"burst": 3}])
def test_set_refuses_anything_but_a_known_limit_and_an_integer_in_range(redis_db: redis.Redis,
                                                                       values: dict[str, object]) -> None:
    store = _store(redis_db)
    with pytest.raises(ValueError, match=next(iter(values))):
        store.set("acct-1", compute_seconds_per_day=5, **values)  # type: ignore[arg-type]
    assert not redis_db.exists(keys.account_limits("acct-1"))  # nothing written, not even the good value


def test_find_answers_the_account_of_a_name_or_none(redis_db: redis.Redis) -> None:
    accounts = Accounts(redis_db)
    account, _key, _created = accounts.create("acme")
    assert accounts.find("acme") == account
    assert accounts.find("nobody") is None


def test_webhook_secret_is_made_once_kept_and_replaced_on_rotate(redis_db: redis.Redis) -> None:
    accounts = Accounts(redis_db)
    account = accounts.create(f"acct-{uuid.uuid4().hex[:6]}")[0]
    secret = accounts.webhook_secret(account.id)
    assert secret.startswith("whsec_") and len(secret) > 40
    assert Accounts(redis_db).webhook_secret(account.id) == secret  # another process gets the same one
    assert redis_db.hget(keys.account(account.id), "webhook_secret") == secret.encode()

    rotated = accounts.webhook_secret(account.id, rotate=True)
    assert rotated.startswith("whsec_") and rotated != secret
    assert accounts.webhook_secret(account.id) == rotated
    assert redis_db.hget(keys.account(account.id), "name") == account.name.encode()  # the rest of the hash stays
