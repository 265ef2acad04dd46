"""The usage reader over an account's daily hashes in a real Redis, and the range a usage request asks for."""
from __future__ import annotations

import datetime as dt
import time
from typing import Iterator

import pytest
import redis
from flask.testing import FlaskClient

from flowpool import keys
from flowpool.api.app import create_app
from flowpool.errors import RequestError
from flowpool.redis_server import RedisServer
from flowpool.registry import Accounts
from flowpool.settings import Settings
from flowpool.usage import UsageReader, day_of, usage_range

ACCOUNT = "acct-1"
DAY1, DAY2, DAY3 = dt.date(2026, 3, 1), dt.date(2026, 3, 2), dt.date(2026, 3, 3)


def _write(db: redis.Redis, day: dt.date, **fields: int) -> None:
    """Fields as the run scripts name them (``runs__succeeded`` stands for ``runs:succeeded``, ``__`` for ``:``)."""
    db.hset(keys.account_usage(ACCOUNT, day.isoformat()), mapping={k.replace("__", ":"): v for k, v in fields.items()})


@pytest.fixture
def usage(redis_db: redis.Redis) -> UsageReader:
    # Two days with usage and one without; two workflows; a model name holding ':'.
    _write(redis_db, DAY1, runs__succeeded=3, runs__failed=1, cache_hits=2, compute_ms=1500, tokens=30,
           prompt_tokens=12, completion_tokens=18, model_tokens__echo=20, **{"model_tokens__gpt:mini": 10},
           wf__asks__runs__succeeded=2, wf__asks__compute_ms=1000, wf__asks__tokens=30, wf__asks__prompt_tokens=12,
           wf__asks__completion_tokens=18, wf__asks__model_tokens__echo=20, **{"wf__asks__model_tokens__gpt:mini": 10},
           wf__echo__runs__succeeded=1, wf__echo__runs__failed=1, wf__echo__compute_ms=500, wf__echo__cache_hits=2)
    _write(redis_db, DAY3, runs__timed_out=1, compute_ms=2001, wf__asks__runs__timed_out=1, wf__asks__compute_ms=2001)
    # Another account's usage, and a day outside the range, are never read.
    redis_db.hset(keys.account_usage("acct-2", DAY1.isoformat()), "runs:succeeded", 100)
    redis_db.hset(keys.account_usage(ACCOUNT, "2026-03-04"), "runs:succeeded", 100)
    return UsageReader(redis_db)


def test_totals_sum_every_day_of_the_range_and_only_the_accounts_own(usage: UsageReader) -> None:
    totals = usage.read(ACCOUNT, DAY1, DAY3, "day")["totals"]
    assert totals == {"runs": {"failed": 1, "succeeded": 3, "timed_out": 1}, "runs_total": 5,
                      "compute_seconds": 3.501, "tokens": {"total": 30, "prompt": 12, "completion": 18,
                                                           "by_model": {"echo": 20, "gpt:mini": 10}},
                      "cache_hits": 2}


def test_group_by_day_lists_every_day_in_order_those_without_usage_as_zeros(usage: UsageReader) -> None:
    read = usage.read(ACCOUNT, DAY1, DAY3, "day")
    assert (read["from"], read["to"], read["group_by"]) == ("2026-03-01", "2026-03-03", "day")
    assert [g["day"] for g in read["groups"]] == ["2026-03-01", "2026-03-02", "2026-03-03"]
    first, empty, last = read["groups"]
    assert first["runs"] == {"failed": 1, "succeeded": 3} and first["cache_hits"] == 2
    assert first["compute_seconds"] == 1.5 and first["tokens"]["by_model"] == {"echo": 20, "gpt:mini": 10}
    assert empty == {"day": "2026-03-02", "runs": {}, "runs_total": 0, "compute_seconds": 0.0,
                     "tokens": {"total": 0, "prompt": 0, "completion": 0, "by_model": {}}, "cache_hits": 0}
    assert last["runs"] == {"timed_out": 1} and last["compute_seconds"] == 2.001


def test_group_by_workflow_sums_each_workflows_prefixed_fields_over_the_days(usage: UsageReader) -> None:
    read = usage.read(ACCOUNT, DAY1, DAY3, "workflow")
    asks, echo = read["groups"]
    assert asks == {"workflow": "asks", "runs": {"succeeded": 2, "timed_out": 1}, "runs_total": 3,
                    "compute_seconds": 3.001, "cache_hits": 0,
                    "tokens": {"total": 30, "prompt": 12, "completion": 18, "by_model": {"echo": 20, "gpt:mini": 10}}}
    assert echo["workflow"] == "echo" and echo["runs"] == {"failed": 1, "succeeded": 1}
    assert echo["cache_hits"] == 2 and echo["compute_seconds"] == 0.5
    assert read["totals"] == usage.read(ACCOUNT, DAY1, DAY3, "day")["totals"]


def test_a_range_without_usage_reads_as_zeros(redis_db: redis.Redis) -> None:
    read = UsageReader(redis_db).read(ACCOUNT, DAY1, DAY1, "workflow")
    assert read["groups"] == [] and read["totals"]["runs_total"] == 0 and read["totals"]["compute_seconds"] == 0


def test_today_counts_todays_use_and_the_slots_not_lapsed_without_writing(redis_db: redis.Redis) -> None:
    now = time.time()
    redis_db.hset(keys.account_usage(ACCOUNT, day_of(now)), mapping={"compute_ms": 2500, "tokens": 77})
    redis_db.zadd(keys.account_slots(ACCOUNT), {"req_a": now + 60, "req_b": now + 600, "req_lapsed": now - 1})
    assert UsageReader(redis_db).today(ACCOUNT, now) == {"compute_seconds": 2.5, "tokens": 77, "in_flight": 2}
    assert redis_db.zcard(keys.account_slots(ACCOUNT)) == 3  # the lapsed slot is left for the scripts to drop
    assert UsageReader(redis_db).today("nobody", now) == {"compute_seconds": 0.0, "tokens": 0, "in_flight": 0}


TODAY = dt.date(2026, 5, 20)


def test_the_range_defaults_to_the_last_30_days_by_day() -> None:
    assert usage_range(None, None, None, 400, TODAY) == (dt.date(2026, 4, 21), TODAY, "day")
    assert usage_range(None, "2026-01-31", "workflow", 400, TODAY) == (dt.date(2026, 1, 2), dt.date(2026, 1, 31),
                                                                       "workflow")
    assert usage_range("2026-05-20", "2026-05-20", "day", 1, TODAY) == (TODAY, TODAY, "day")


@pytest.mark.parametrize("args, param, words", [
    (("2026-5-1", None, None), "from", "YYYY-MM-DD"),
    (("2026-02-30", None, None), "from", "YYYY-MM-DD"),
    ((None, "yesterday", None), "to", "YYYY-MM-DD"),
    (("2026-05-02", "2026-05-01", None), "from", "after"),
    (("2025-01-01", "2026-05-20", None), "from", "kept 400 days"),
    ((None, None, "month"), "group_by", "day, workflow"),
])
def test_a_bad_range_or_grouping_is_a_400_naming_the_parameter(args: tuple[str | None, ...], param: str,
                                                               words: str) -> None:
    with pytest.raises(RequestError) as raised:
        usage_range(*args, 400, TODAY)
    assert raised.value.status == 400 and raised.value.details == {"param": param}
    assert words in raised.value.message


# The routes, served by the app on database 15 (no worker: these routes need none).

@pytest.fixture
def api(redis_server: RedisServer, redis_db: redis.Redis) -> Iterator[FlaskClient]:
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", sandbox_prestart=0,
                              default_rpm=600))
    yield app.test_client()
    app.extensions["flowpool"].redis.close()


def test_the_usage_route_answers_the_callers_own_usage_with_its_limits_and_today(
        api: FlaskClient, redis_db: redis.Redis) -> None:
    account, key, _ = Accounts(redis_db).create("alice")
    today = day_of(time.time())
    redis_db.hset(keys.account_usage(account.id, today), mapping={"runs:succeeded": 2, "compute_ms": 1234,
                                                                  "tokens": 40, "wf:echo:runs:succeeded": 2})
    redis_db.hset(keys.account_limits(account.id), "concurrency", 3)
    redis_db.zadd(keys.account_slots(account.id), {"req_a": time.time() + 60})
    response = api.get("/api/v1/usage", query_string={"group_by": "workflow"}, headers={"x-api-key": key})
    assert response.status_code == 200, response.text
    data = response.get_json()["data"]
    assert data["to"] == today and data["group_by"] == "workflow"
    assert data["totals"]["runs"] == {"succeeded": 2} and data["totals"]["compute_seconds"] == 1.234
    assert [(g["workflow"], g["runs_total"]) for g in data["groups"]] == [("echo", 2)]
    assert data["limits"] == {"concurrency": 3, "rpm": 600, "tokens_per_day": 0, "compute_seconds_per_day": 0}
    assert data["today"] == {"compute_seconds": 1.234, "tokens": 40, "in_flight": 1}
    _, other_key, _ = Accounts(redis_db).create("bob")
    other = api.get("/api/v1/usage", headers={"x-api-key": other_key}).get_json()["data"]
    assert other["totals"]["runs_total"] == 0 and len(other["groups"]) == 30


def test_the_usage_route_refuses_a_bad_query_and_a_missing_key(api: FlaskClient, redis_db: redis.Redis) -> None:
    _, key, _ = Accounts(redis_db).create("alice")
    bad = api.get("/api/v1/usage", query_string={"from": "last week"}, headers={"x-api-key": key})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "from"
    assert api.get("/api/v1/usage").status_code == 401


def test_metrics_show_each_accounts_compute_and_tokens_by_id_never_its_name_and_refusals_by_limit(
        api: FlaskClient, redis_db: redis.Redis) -> None:
    """/metrics is public by default (no FLOWPOOL_METRICS_TOKEN): account names, often customers', stay off it."""
    alice, _, _ = Accounts(redis_db).create("alice")
    redis_db.hset(keys.METRICS, mapping={f"account_compute_ms:{alice.id}": 2500, f"account_tokens:{alice.id}": 90,
                                         "account_tokens:gone-account": 5, "quota_refusals:rpm": 4,
                                         "quota_refusals:concurrency": 1})
    text = api.get("/metrics").get_data(as_text=True)
    assert f'flowpool_account_compute_seconds_total{{account="{alice.id}"}} 2.5' in text.splitlines()
    assert f'flowpool_account_tokens_total{{account="{alice.id}"}} 90.0' in text.splitlines()
    assert 'flowpool_account_tokens_total{account="gone-account"} 5.0' in text.splitlines()
    assert 'flowpool_quota_refusals_total{limit="rpm"} 4.0' in text.splitlines()
    assert 'flowpool_quota_refusals_total{limit="concurrency"} 1.0' in text.splitlines()
    assert "alice" not in text and "flowpool_account_info" not in text


def test_with_the_metrics_token_set_an_info_metric_joins_account_ids_to_names(
        redis_server: RedisServer, redis_db: redis.Redis) -> None:
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", sandbox_prestart=0,
                              metrics_token="scrape-token"))
    try:
        alice, _, _ = Accounts(redis_db).create("alice")
        Accounts(redis_db).create("quiet")  # no runs counted: not named either
        redis_db.hset(keys.METRICS, mapping={f"account_tokens:{alice.id}": 90, "account_tokens:gone-account": 5})
        text = app.test_client().get("/metrics", headers={"Authorization": "Bearer scrape-token"}).get_data(
            as_text=True)
    finally:
        app.extensions["flowpool"].redis.close()
    info = [line for line in text.splitlines() if line.startswith("flowpool_account_info{")]
    assert info == [f'flowpool_account_info{{account="{alice.id}",name="alice"}} 1.0']
    assert f'flowpool_account_tokens_total{{account="{alice.id}"}} 90.0' in text.splitlines()


def test_the_openapi_document_describes_the_usage_query(api: FlaskClient) -> None:
    operation = api.get("/openapi.json").get_json()["paths"]["/api/v1/usage"]["get"]
    assert [p["name"] for p in operation["parameters"]] == ["from", "to", "group_by"]
    assert operation["security"] == [{"apiKey": []}, {"maitaiApiKey": []}, {"bearer": []}]
