"""Quotas, fair-share lanes, slot release and usage counting, in the Lua scripts themselves, against a real Redis.

BEGIN checks an account's limits and picks a queued run's lane; FINISH and
ABANDON give its slot back and count its usage, once.
"""
from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from flowpool import keys
from flowpool.api.admission import _fingerprint
from flowpool.api.models import InvokeRequest
from flowpool.cache import ResultCache
from flowpool.errors import QuotaExceeded, RunNotStarted, WorkerLost
from flowpool.quotas import SLOT_MARGIN_SECONDS, Quota, refusal, seconds_to_midnight, token_increments
from flowpool.redis_server import RedisServer
from flowpool.run import RunEnd, RunRecord, RunStatus
from flowpool.runs import RunStore
from flowpool.sealing import ServerKey
from flowpool.settings import Settings
from flowpool.usage import day_of
from flowpool.tasks.worker import WorkerRuntime

ACCOUNT = "acct-a"
OTHER = "acct-b"
REF = "summarize"


@pytest.fixture
def runs(redis_db: redis.Redis) -> RunStore:
    return RunStore(redis_db, ttl_seconds=600, runs_per_workflow=1000, usage_days=2)


def quota(account: str = ACCOUNT, defaults: tuple[int, int, int, int] = (0, 0, 0, 0), queue_slots: int = 0,
          fair_share: bool = True, slot_seconds: float = 60) -> Quota:
    return Quota(account_id=account, ref=REF, defaults=defaults, queue_slots=queue_slots, fair_share=fair_share,
                 slot_seconds=slot_seconds, usage_ttl_seconds=86400, day=day_of(time.time()))


def record(request_id: str, account: str = ACCOUNT, **fields: Any) -> RunRecord:
    return RunRecord(**{"request_id": request_id, "account": account, "workflow": REF, "status": RunStatus.QUEUED,
                        "version": "1.0.0", "queued_at": time.time(), **fields})


def start(runs: RunStore, request_id: str, account: str = ACCOUNT, q: Quota | None = None,
          lock_seconds: float = 60, **kwargs: Any) -> tuple[str, Any]:
    return runs.begin(record(request_id, account), lock_seconds=lock_seconds, quota=q or quota(account), **kwargs)


def limit(client: redis.Redis, account: str = ACCOUNT, **values: int) -> None:
    client.hset(keys.account_limits(account), mapping=values)


def usage(client: redis.Redis, account: str = ACCOUNT) -> dict[str, int]:
    raw = client.hgetall(keys.account_usage(account, day_of(time.time())))
    return {k.decode(): int(v) for k, v in raw.items()}


def slots(client: redis.Redis, account: str = ACCOUNT) -> list[str]:
    return [m.decode() for m in client.zrange(keys.account_slots(account), 0, -1)]


def finish(runs: RunStore, request_id: str, status: str = "succeeded", tokens: Any = ()) -> int:
    """Claim the run and end it as its worker does; the FINISH answer."""
    assert runs.claim(request_id, "worker-1", 10_000, hard_seconds=60, token="t1")
    return finish_claimed(runs, request_id, status, tokens)


def finish_claimed(runs: RunStore, request_id: str, status: str = "succeeded", tokens: Any = ()) -> int:
    pipe = runs.redis.pipeline()
    runs.finish(pipe, request_id, RunEnd(status=status, version="1.0.0", output="ok"), {"output": "ok"},
                claim="t1", tokens=tokens)
    return pipe.execute()[0]


def refused(runs: RunStore, request_id: str, **kwargs: Any) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as caught:
        start(runs, request_id, **kwargs)
    return caught.value


# Refusals


def test_concurrency_limit_refuses_the_next_run_and_writes_nothing(runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, concurrency=2)
    assert start(runs, "req_1")[0] == "queued"
    assert start(runs, "req_2")[0] == "queued"

    error = refused(runs, "req_3")

    assert error.status == 429 and error.retry_safe and error.retry_after == 1
    assert error.details == {"limit": "concurrency", "used": 2, "allowed": 2}
    assert "concurrency limit: 2 of 2 runs queued or running" in error.message
    assert redis_db.exists(keys.run("req_3")) == 0
    assert runs.list_for_workflow(ACCOUNT, REF, 0, 10)[1] == 2
    assert sorted(slots(redis_db)) == ["req_1", "req_2"]
    assert redis_db.hget(keys.METRICS, "quota_refusals:concurrency") == b"1"
    # Another account is not held back by this one's limit.
    assert start(runs, "req_b", account=OTHER)[0] == "queued"


def test_the_default_applies_unless_the_account_has_its_own_and_zero_means_none(runs: RunStore,
                                                                                 redis_db: redis.Redis) -> None:
    by_default = quota(defaults=(1, 0, 0, 0))
    assert start(runs, "req_1", q=by_default)[0] == "queued"
    assert refused(runs, "req_2", q=by_default).details["limit"] == "concurrency"

    limit(redis_db, concurrency=0)  # the operator lifted it for this account
    assert start(runs, "req_3", q=by_default)[0] == "queued"


def test_rate_allows_a_burst_of_rpm_then_refuses_with_the_wait(runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, rpm=3)
    for n in range(3):
        assert start(runs, f"req_{n}")[0] == "queued"

    error = refused(runs, "req_3")

    assert error.details == {"limit": "rpm", "used": 3, "allowed": 3}
    assert 1 <= error.retry_after <= 20  # one request every 20 s after the burst
    assert "rate limit: 3 of 3 requests per minute" in error.message
    assert redis_db.exists(keys.run("req_3")) == 0 and "req_3" not in slots(redis_db)
    assert 0 < redis_db.pttl(keys.account_rate(ACCOUNT)) <= 61_000


def test_rate_lets_the_next_request_through_once_its_interval_passed(runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, rpm=120)  # a burst of 120, then one every 500 ms
    for n in range(240):  # a slow machine refills some of the burst meanwhile: go on until refused
        try:
            start(runs, f"req_{n}")
        except QuotaExceeded as exc:
            error = exc
            break
    else:
        raise AssertionError("240 requests within a burst of 120 and one per 500 ms were all admitted")
    assert error.retry_after == 1  # at most 500 ms, rounded up to whole seconds
    time.sleep(0.6)
    assert start(runs, "req_late")[0] == "queued"


def test_the_largest_rate_an_operator_may_set_admits_a_stream_of_requests(runs: RunStore,
                                                                         redis_db: redis.Redis) -> None:
    limit(redis_db, rpm=10**12)  # limits.MAX_LIMIT: an interval below a double's resolution of Redis's clock
    for n in range(50):
        assert start(runs, f"req_{n}")[0] == "queued"


def test_a_refused_request_consumes_no_rate(runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, rpm=2, concurrency=1)
    assert start(runs, "req_1")[0] == "queued"
    assert refused(runs, "req_2").details["limit"] == "concurrency"
    assert finish(runs, "req_1") == 1
    assert start(runs, "req_3")[0] == "queued"  # the second of the burst: the refusal took none


@pytest.mark.parametrize("name, field, stored, used", [
    ("tokens_per_day", "tokens", 1000, 1000),
    ("compute_seconds_per_day", "compute_ms", 60_000, 60),
])
def test_daily_budgets_refuse_new_runs_until_midnight(runs: RunStore, redis_db: redis.Redis, name: str, field: str,
                                                      stored: int, used: int) -> None:
    limit(redis_db, **{name: 1000 if name == "tokens_per_day" else 60})
    redis_db.hset(keys.account_usage(ACCOUNT, day_of(time.time())), field, stored - 1)
    assert start(runs, "req_1")[0] == "queued"  # under the budget still
    redis_db.hincrby(keys.account_usage(ACCOUNT, day_of(time.time())), field, 1)

    error = refused(runs, "req_2")

    assert error.details == {"limit": name, "used": used, "allowed": 1000 if name == "tokens_per_day" else 60}
    assert abs(error.retry_after - seconds_to_midnight()) <= 2
    assert "daily" in error.message and name in error.message
    assert redis_db.exists(keys.run("req_2")) == 0
    # Yesterday's usage does not count today.
    assert start(runs, "req_other", account=OTHER)[0] == "queued"


def test_an_idempotent_replay_is_never_refused_and_consumes_nothing(runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, concurrency=1, rpm=1)
    idem = (keys.idempotency(ACCOUNT, "k"), "fingerprint", 60.0)
    assert start(runs, "req_1", idempotency=idem) == ("queued", 0)

    assert start(runs, "req_2", idempotency=idem) == ("replay", "req_1")
    assert start(runs, "req_3", idempotency=(idem[0], "another", 60.0)) == ("conflict", "req_1")
    assert redis_db.hget(keys.METRICS, "quota_refusals:rpm") is None
    assert slots(redis_db) == ["req_1"]  # the replay took no slot of its own
    assert finish(runs, "req_1") == 1
    assert start(runs, "req_4", idempotency=idem) == ("replay", "req_1")  # an ended first run: still no slot
    assert slots(redis_db) == []


def test_a_cache_hit_passes_concurrency_but_not_the_rate_and_is_counted(runs: RunStore,
                                                                       redis_db: redis.Redis) -> None:
    cache = ResultCache(redis_db, ServerKey(redis_db, None))
    key = cache.key(ACCOUNT, "c" * 64, "e" * 64, {"input": 1}, None)
    pipe = redis_db.pipeline()
    cache.put(pipe, ACCOUNT, key, {"output": "cached"}, ttl=60)
    pipe.execute()
    limit(redis_db, concurrency=1, rpm=2)
    cache_keys = ResultCache.redis_keys(ACCOUNT, key)
    assert start(runs, "req_1")[0] == "queued"  # the one slot taken

    assert start(runs, "req_2", cache_keys=cache_keys)[0] == "hit-unrecorded"
    assert refused(runs, "req_3", cache_keys=cache_keys).details["limit"] == "rpm"
    assert usage(redis_db) == {"cache_hits": 1, f"wf:{REF}:cache_hits": 1}


def test_a_hit_found_by_a_cache_of_its_own_is_recorded_counted_and_takes_no_slot(runs: RunStore,
                                                                                redis_db: redis.Redis) -> None:
    limit(redis_db, concurrency=1)
    assert start(runs, "req_1")[0] == "queued"
    hit = record("req_hit", status=RunStatus.SUCCEEDED, cache_hit=True, output="cached")

    assert runs.begin(hit, lock_seconds=60, quota=quota())[0] == "queued"  # what begin calls writing a record

    assert runs.get("req_hit").status == "succeeded"  # type: ignore[union-attr]
    assert slots(redis_db) == ["req_1"]
    assert usage(redis_db)["cache_hits"] == 1


def test_join_takes_no_slot_and_a_request_that_must_not_join_queues_beside(runs: RunStore,
                                                                          redis_db: redis.Redis) -> None:
    cache_keys = ResultCache.redis_keys(ACCOUNT, "k" * 64)
    assert start(runs, "req_1", cache_keys=cache_keys)[0] == "queued"

    assert start(runs, "req_2", cache_keys=cache_keys) == ("join", "req_1")
    assert start(runs, "req_3", cache_keys=cache_keys, join=False)[0] == "queued"

    assert sorted(slots(redis_db)) == ["req_1", "req_3"]
    assert redis_db.get(cache_keys[1]) == b"req_1"  # the lock stays the leader's


def test_take_rate_counts_a_join_found_elsewhere_against_the_rate(runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, rpm=1)
    runs.take_rate(quota())
    with pytest.raises(QuotaExceeded):
        runs.take_rate(quota())
    with pytest.raises(QuotaExceeded):
        start(runs, "req_1")


def test_without_a_quota_nothing_is_checked_or_taken(runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, concurrency=1)
    for n in range(3):
        assert runs.begin(record(f"req_{n}"), lock_seconds=60) == ("queued", None)
    assert slots(redis_db) == []


# Fair share


def test_lanes_follow_the_accounts_share_of_the_queues_slots_in_steps_of_four(runs: RunStore,
                                                                               redis_db: redis.Redis) -> None:
    # One account alone on 4 slots: a share of 4; lane 3 within 4 shares, 6 within 16, 9 beyond.
    lanes = [start(runs, f"req_a{n}", q=quota(queue_slots=4))[1] for n in range(70)]
    assert lanes == [0] * 4 + [3] * 12 + [6] * 48 + [9] * 6

    # A second account: its share is half the slots (2), and its first runs go first.
    assert [start(runs, f"req_b{n}", account=OTHER, q=quota(OTHER, queue_slots=4))[1] for n in range(9)] == \
        [0] * 2 + [3] * 6 + [6]
    assert {m.decode() for m in redis_db.zrange(keys.ACTIVE_ACCOUNTS, 0, -1)} == {ACCOUNT, OTHER}


def test_lanes_without_known_slots_use_a_share_of_one_and_without_fair_share_are_all_zero(
        runs: RunStore) -> None:
    # queue_slots 0: an autoscaled queue at zero, or before the first heartbeat. One run per account in lane 0.
    assert [start(runs, f"req_{n}", q=quota(queue_slots=0))[1] for n in range(18)] == \
        [0] + [3] * 3 + [6] * 12 + [9] * 2
    assert start(runs, "req_b", account=OTHER, q=quota(OTHER, queue_slots=0))[1] == 0
    assert [start(runs, f"req_off{n}", account="acct-c", q=quota("acct-c", queue_slots=1, fair_share=False))[1]
            for n in range(5)] == [0] * 5


def test_a_lapsed_slot_is_not_counted(runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, concurrency=1)
    assert start(runs, "req_1", q=quota(slot_seconds=0.05))[0] == "queued"  # unclaimed, it lapses at once
    time.sleep(0.1)
    assert start(runs, "req_2")[0] == "queued"
    assert slots(redis_db) == ["req_2"]
    assert redis_db.ttl(keys.account_slots(ACCOUNT)) > 0  # the key lapses with its last slot


def test_a_queued_slot_lapses_when_its_claim_can_no_longer_come_and_the_claim_takes_it_by_its_lease(
        runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, concurrency=1)
    before = time.time()
    assert start(runs, "req_1", q=quota(slot_seconds=0.05), lock_seconds=600)[0] == "queued"
    # Scored by the longest its claim may still come, not by the run's whole deadline (its lock).
    # (Scores are on Redis's clock, to the millisecond.)
    assert before + 0.049 <= redis_db.zscore(keys.account_slots(ACCOUNT), "req_1") <= time.time() + 0.05
    assert redis_db.zscore(keys.RUNS_ACTIVE, "req_1") >= before + 600  # the reaper's deadline is unchanged
    time.sleep(0.1)
    assert start(runs, "req_2")[0] == "queued"  # req_1's slot lapsed: pruned, not counted
    assert slots(redis_db) == ["req_2"]

    claimed_at = time.time()
    assert runs.claim("req_2", "worker-1", 10_000, hard_seconds=900, token="t1")

    assert claimed_at + 9.999 <= redis_db.zscore(keys.account_slots(ACCOUNT), "req_2") <= time.time() + 10
    assert redis_db.pttl(keys.account_slots(ACCOUNT)) > 899_000  # kept until the run's hard deadline
    assert refused(runs, "req_3").details == {"limit": "concurrency", "used": 1, "allowed": 1}


def test_a_queued_slot_is_kept_as_long_as_its_claim_may_still_come(runs: RunStore, redis_db: redis.Redis) -> None:
    # The broker drops it at the queue wait; a worker that took it just before retries its claim through a
    # Redis outage. A claim coming that late must find its slot still held, not given to another run.
    settings = Settings(queue_wait_seconds=60, redis_outage_seconds=30)
    q = Quota.for_request(settings, ACCOUNT, REF, queue_slots=0)
    assert q.slot_seconds == 60 + 30 + SLOT_MARGIN_SECONDS
    before = time.time()

    assert start(runs, "req_1", q=q, lock_seconds=600)[0] == "queued"

    assert before + 94.999 <= redis_db.zscore(keys.account_slots(ACCOUNT), "req_1") <= time.time() + 95
    assert redis_db.pttl(keys.account_slots(ACCOUNT)) >= 95_000  # the key outlives the slot


def test_a_claim_keeps_a_slots_key_its_zadd_made_from_living_forever(runs: RunStore, redis_db: redis.Redis) -> None:
    assert runs.begin(record("req_1"), lock_seconds=60) == ("queued", None)  # no quota: no slot, no slots key
    assert redis_db.exists(keys.account_slots(ACCOUNT)) == 0

    assert runs.claim("req_1", "worker-1", 10_000, hard_seconds=60, token="t1")

    assert slots(redis_db) == ["req_1"]
    assert 60_000 < redis_db.pttl(keys.account_slots(ACCOUNT)) <= 61_000


class _SkewedClock:
    """The ``time`` module as a process whose clock is ``skew`` seconds off sees it (the one fault injected)."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_slots_are_scored_and_pruned_on_redis_clock_not_the_workers(runs: RunStore, redis_db: redis.Redis,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for request_id in ("req_1", "req_2"):
        assert start(runs, request_id)[0] == "queued"
    # Queued by an API process an hour behind: its slot is still held for the whole slot time.
    assert runs.begin(record("req_3", queued_at=time.time() - 3600), lock_seconds=60, quota=quota())[0] == "queued"
    assert time.time() + 59 <= redis_db.zscore(keys.account_slots(ACCOUNT), "req_3") <= time.time() + 60
    monkeypatch.setattr("flowpool.runs.time", _SkewedClock(-3600))  # a worker an hour behind

    assert runs.claim("req_1", "worker-1", 10_000, hard_seconds=60, token="t1")

    assert time.time() + 9 <= redis_db.zscore(keys.account_slots(ACCOUNT), "req_1") <= time.time() + 10
    monkeypatch.setattr("flowpool.runs.time", _SkewedClock(3600))  # and one an hour ahead ends its run
    assert runs.claim("req_2", "worker-2", 10_000, hard_seconds=60, token="t1")
    assert finish_claimed(runs, "req_2") == 1

    assert sorted(slots(redis_db)) == ["req_1", "req_3"]  # its end pruned no slot that had not lapsed


def test_the_workers_heartbeat_moves_its_runs_slots_with_their_leases(runs: RunStore, redis_db: redis.Redis,
                                                                      runtime: WorkerRuntime) -> None:
    for request_id in ("req_1", "req_2"):
        assert start(runs, request_id)[0] == "queued"
        assert runtime.runs.claim(request_id, runtime.name, runtime.lease_ms, hard_seconds=60, token="t1")
        runtime.active[request_id] = "default"
        runtime.accounts[request_id] = ACCOUNT
    claimed = redis_db.zscore(keys.account_slots(ACCOUNT), "req_1")
    assert finish_claimed(runs, "req_2") == 1  # ended, its worker not told yet
    time.sleep(0.05)

    runtime._send_beat()

    assert redis_db.zscore(keys.account_slots(ACCOUNT), "req_1") >= claimed + 0.05
    assert slots(redis_db) == ["req_1"]  # a slot given back is not taken again by a beat


def test_a_beat_brings_back_a_slot_that_lapsed_while_the_beats_were_held_up(runs: RunStore, redis_db: redis.Redis,
                                                                            runtime: WorkerRuntime) -> None:
    limit(redis_db, concurrency=2)
    assert start(runs, "req_1")[0] == "queued"
    assert runtime.runs.claim("req_1", runtime.name, 50, hard_seconds=60, token="t1")  # a lease of 50 ms
    runtime.active["req_1"], runtime.accounts["req_1"] = "default", ACCOUNT
    time.sleep(0.1)  # no beat came (Redis was down): the lease and the slot lapsed
    assert start(runs, "req_2")[0] == "queued"
    assert slots(redis_db) == ["req_2"]  # req_1's slot pruned
    before = time.time()

    runtime._send_beat()

    assert sorted(slots(redis_db)) == ["req_1", "req_2"]
    lease = runtime.lease_ms / 1000
    assert before + lease - 0.001 <= redis_db.zscore(keys.account_slots(ACCOUNT), "req_1") <= time.time() + lease
    assert refused(runs, "req_3").details == {"limit": "concurrency", "used": 2, "allowed": 2}


def test_a_beat_brings_back_a_slots_key_that_expired_and_keeps_it_for_the_lease(runs: RunStore,
                                                                               redis_db: redis.Redis,
                                                                               runtime: WorkerRuntime) -> None:
    assert runs.begin(record("req_1"), lock_seconds=60) == ("queued", None)
    assert runtime.runs.claim("req_1", runtime.name, 50, hard_seconds=0, token="t1")  # the key kept 1.05 s
    runtime.active["req_1"], runtime.accounts["req_1"] = "default", ACCOUNT
    time.sleep(1.2)
    assert redis_db.exists(keys.account_slots(ACCOUNT)) == 0

    redis_db.zrem(keys.ACTIVE_ACCOUNTS, ACCOUNT)  # an end that found the slots lapsed let the account go

    runtime._send_beat()

    assert slots(redis_db) == ["req_1"]
    assert runtime.lease_ms < redis_db.pttl(keys.account_slots(ACCOUNT)) <= runtime.lease_ms + 1000
    # The account shares the pool again while its run goes, so fair share counts it.
    assert redis_db.zscore(keys.ACTIVE_ACCOUNTS, ACCOUNT) > time.time()


def test_a_beat_renews_only_the_slots_of_runs_still_running_under_its_worker(runs: RunStore, redis_db: redis.Redis,
                                                                            runtime: WorkerRuntime) -> None:
    for request_id in ("req_queued", "req_theirs", "req_lost"):
        assert start(runs, request_id)[0] == "queued"
        runtime.active[request_id], runtime.accounts[request_id] = "default", ACCOUNT
    assert runs.claim("req_theirs", "worker-other", 600_000, hard_seconds=900, token="t2")  # another's delivery
    assert runtime.runs.claim("req_lost", runtime.name, 600_000, hard_seconds=900, token="t1")
    assert runs.abandon("req_lost", RunStatus.RUNNING, WorkerLost("taken for lost"), "1.0.0", force=True)
    scores = dict(redis_db.zrange(keys.account_slots(ACCOUNT), 0, -1, withscores=True))

    runtime._send_beat()

    assert dict(redis_db.zrange(keys.account_slots(ACCOUNT), 0, -1, withscores=True)) == scores


def test_a_beat_loads_the_renewal_script_into_a_redis_that_lost_it(runs: RunStore) -> None:
    with RedisServer() as own:  # a Redis of its own: its script cache starts empty, as after a restart
        runtime = WorkerRuntime(Settings(redis_url=own.url, sandbox_prestart=0), name="worker-b")
        try:
            store = RunStore(runtime.redis, ttl_seconds=600, runs_per_workflow=1000, usage_days=2)
            assert store.begin(record("req_1"), lock_seconds=60, quota=quota())[0] == "queued"
            assert store.claim("req_1", runtime.name, 50, hard_seconds=60, token="t1")
            runtime.active["req_1"], runtime.accounts["req_1"] = "default", ACCOUNT
            assert runtime.redis.script_exists(runtime.runs._renew.sha) == [False]

            runtime._send_beat()

            lease = runtime.lease_ms / 1000
            assert runtime.redis.zscore(keys.account_slots(ACCOUNT), "req_1") > time.time() + lease - 1
        finally:
            runtime.redis.close()


# Slots back and usage counted where runs end


def test_finish_releases_the_slot_and_counts_usage_once(runs: RunStore, redis_db: redis.Redis) -> None:
    limit(redis_db, concurrency=1)
    assert start(runs, "req_1")[0] == "queued"
    assert redis_db.zscore(keys.ACTIVE_ACCOUNTS, ACCOUNT) is not None
    assert runs.claim("req_1", "worker-1", 10_000, hard_seconds=60, token="t1")
    time.sleep(0.05)
    tokens = [("tokens", 30), ("prompt_tokens", 10), ("completion_tokens", 20), ("model_tokens:m-1", 30)]

    assert finish_claimed(runs, "req_1", tokens=tokens) == 1
    assert finish_claimed(runs, "req_1", tokens=tokens) == 0  # written once: counted once

    assert slots(redis_db) == [] and redis_db.zscore(keys.ACTIVE_ACCOUNTS, ACCOUNT) is None
    counted = usage(redis_db)
    assert counted["runs:succeeded"] == 1 and counted[f"wf:{REF}:runs:succeeded"] == 1
    assert counted["compute_ms"] >= 40 and counted[f"wf:{REF}:compute_ms"] == counted["compute_ms"]
    for field, amount in tokens:
        assert counted[field] == amount and counted[f"wf:{REF}:{field}"] == amount
    assert 0 < redis_db.ttl(keys.account_usage(ACCOUNT, day_of(time.time()))) <= 86400 * 2
    metrics = redis_db.hgetall(keys.METRICS)
    assert int(metrics[f"account_tokens:{ACCOUNT}".encode()]) == 30
    assert int(metrics[f"account_compute_ms:{ACCOUNT}".encode()]) == counted["compute_ms"]
    assert start(runs, "req_2")[0] == "queued"  # the slot came back


def test_abandon_of_a_queued_run_releases_its_slot_and_counts_it_once(runs: RunStore,
                                                                      redis_db: redis.Redis) -> None:
    limit(redis_db, concurrency=1)
    assert start(runs, "req_1")[0] == "queued"
    assert start(runs, "req_other", account=OTHER)[0] == "queued"

    assert runs.abandon("req_1", RunStatus.QUEUED, RunNotStarted("no worker"), "1.0.0")
    assert not runs.abandon("req_1", RunStatus.QUEUED, RunNotStarted("again"), "1.0.0")

    assert slots(redis_db) == []
    assert redis_db.zscore(keys.ACTIVE_ACCOUNTS, ACCOUNT) is None
    assert redis_db.zscore(keys.ACTIVE_ACCOUNTS, OTHER) is not None  # the other account still has a run
    assert usage(redis_db) == {"runs:expired": 1, f"wf:{REF}:runs:expired": 1}
    assert start(runs, "req_2")[0] == "queued"


def test_an_end_prunes_lapsed_slots_before_it_lets_the_account_go(runs: RunStore, redis_db: redis.Redis) -> None:
    assert start(runs, "req_gone", q=quota(slot_seconds=0.05))[0] == "queued"  # its end is never written
    assert start(runs, "req_1")[0] == "queued"
    time.sleep(0.1)

    assert finish(runs, "req_1") == 1

    assert redis_db.exists(keys.account_slots(ACCOUNT)) == 0
    assert redis_db.zscore(keys.ACTIVE_ACCOUNTS, ACCOUNT) is None  # no longer taken as sharing the pool


def test_a_withdrawn_run_gives_its_slot_back_and_leaves_its_webhook_alone(runs: RunStore,
                                                                         redis_db: redis.Redis) -> None:
    limit(redis_db, concurrency=1)
    assert start(runs, "req_1")[0] == "queued"
    redis_db.hset(keys.run_webhook("req_1"), mapping={"url": "http://127.0.0.1:9/", "status": "pending"})

    # As admission's _withdraw ends a run the broker did not take.
    assert runs.abandon("req_1", RunStatus.QUEUED, RunNotStarted("the broker did not take the run"), "1.0.0",
                        notify=False)

    assert redis_db.zcard(keys.WEBHOOKS_DUE) == 0
    assert slots(redis_db) == [] and redis_db.zscore(keys.ACTIVE_ACCOUNTS, ACCOUNT) is None
    assert start(runs, "req_2")[0] == "queued"


def test_a_lost_runs_compute_is_capped_at_its_hard_limit(redis_db: redis.Redis) -> None:
    runs = RunStore(redis_db, ttl_seconds=600, runs_per_workflow=1000, usage_days=2, hard_grace_seconds=0.05)
    assert runs.begin(record("req_1", timeout_seconds=0.05), lock_seconds=60, quota=quota())[0] == "queued"
    assert runs.claim("req_1", "worker-1", 10_000, hard_seconds=0.1, token="t1")
    time.sleep(0.4)  # its worker died; the reaper ends it well past its hard limit

    assert runs.abandon("req_1", RunStatus.RUNNING, WorkerLost("its worker died"), "1.0.0", force=True)

    counted = usage(redis_db)
    assert counted["compute_ms"] == 100 and counted[f"wf:{REF}:compute_ms"] == 100


def test_abandon_of_a_lost_run_counts_its_compute_time(runs: RunStore, redis_db: redis.Redis) -> None:
    assert start(runs, "req_1")[0] == "queued"
    assert runs.claim("req_1", "worker-1", 10_000, hard_seconds=60, token="t1")
    time.sleep(0.05)

    assert runs.abandon("req_1", RunStatus.RUNNING, WorkerLost("its worker died"), "1.0.0", force=True)

    counted = usage(redis_db)
    assert counted["runs:lost"] == 1 and counted["compute_ms"] >= 40
    assert "tokens" not in counted
    assert slots(redis_db) == []
    assert finish_claimed(runs, "req_1") == 0 and usage(redis_db) == counted  # the late end counts nothing


def test_an_end_makes_the_runs_webhook_due_and_only_if_it_has_one(runs: RunStore, redis_db: redis.Redis) -> None:
    for request_id in ("req_hook", "req_plain"):
        assert start(runs, request_id)[0] == "queued"
    redis_db.hset(keys.run_webhook("req_hook"), mapping={"url": "http://127.0.0.1:9/", "status": "pending"})
    before = time.time()

    assert finish(runs, "req_hook") == 1
    assert runs.abandon("req_plain", RunStatus.QUEUED, RunNotStarted("no worker"), "1.0.0")

    due = dict(redis_db.zrange(keys.WEBHOOKS_DUE, 0, -1, withscores=True))
    assert list(due) == [b"req_hook"] and before <= due[b"req_hook"] <= time.time()


# The Python side


def test_an_idempotency_fingerprint_holds_the_webhook_url() -> None:
    body = InvokeRequest(model="workflow:summarize", input={"text": "hi"})
    svc: Any = None  # a body without secrets needs no server key

    plain, hooked = _fingerprint(svc, body), _fingerprint(svc, body, "https://example.test/hook")

    assert plain == _fingerprint(svc, body, None)  # without one: as it was before webhooks
    assert hooked != plain
    assert hooked != _fingerprint(svc, body, "https://example.test/other")
    assert hooked == _fingerprint(svc, body, "https://example.test/hook")


def test_token_increments_sum_the_calls_by_field_and_model() -> None:
    records = [{"model": "m-1", "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
               {"model": "m-2", "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
               {"model": "m-1", "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "status": "error"}]
    assert dict(token_increments(records)) == {"tokens": 9, "prompt_tokens": 4, "completion_tokens": 5,
                                               "model_tokens:m-1": 7, "model_tokens:m-2": 2}
    assert token_increments([]) == []
    assert json.loads(json.dumps(token_increments(records)))  # what FINISH decodes


def test_refusal_rounds_the_rate_wait_up_to_whole_seconds() -> None:
    assert refusal([b"quota", b"rpm", 5, 5, 1]).retry_after == 1
    assert refusal([b"quota", b"rpm", 5, 5, 12_001]).retry_after == 13
    assert 1 <= seconds_to_midnight(86400 * 20000 - 0.5) <= 1
    assert seconds_to_midnight(86400 * 20000) == 86400
