"""Listing an account's runs (GET /api/v1/runs), what a run's record keeps of its request, and a workflow's stats.

Over HTTP against the session's stack: runs are made by invoking workflows that answer at once, then read back
through the list, its filters and its cursor, the run's own view and ``GET /api/v1/workflows/<ref>/stats``.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

import redis

from flowpool import keys
from flowpool.devstack import Stack
from flowpool.run import RunRecord, RunStatus
from flowpool.runs import RunStore
from tests.helpers import Client, account_id, error_of

RUNS = "/api/v1/runs"

# Answers at once; fails when asked to. No cache, so each invoke is a run of its own.
QUICK = """
    CACHE_TTL_SECONDS = 0

    def execute(ctx):
        if (ctx.input or {}).get("fail"):
            raise ValueError("asked to fail")
        return {"n": (ctx.input or {}).get("n")}
"""

# The same, cached: a repeat is a cache hit.
CACHED = """
    def execute(ctx):
        return {"n": (ctx.input or {}).get("n")}
"""


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _run(client: Client, ref: str, **body: Any) -> str:
    """Invoke ``ref`` and wait for its answer; the run's request id."""
    response = client.invoke(ref, **body)
    assert response.status_code in (200, 500), response.text
    return response.headers["X-Request-Id"]


def _list(client: Client, **params: Any) -> dict[str, Any]:
    response = client.get(RUNS, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _ids(client: Client, **params: Any) -> list[str]:
    return [run["request_id"] for run in _list(client, **params)["data"]]


def test_runs_are_listed_newest_first_across_workflows_cache_hits_included(client: Client) -> None:
    first, second, cached = _ref("first"), _ref("second"), _ref("cached")
    client.upload(first, QUICK)
    client.upload(second, QUICK)
    client.upload(cached, CACHED)

    made = [_run(client, first, input={"n": 1}), _run(client, second, input={"n": 2}),
            _run(client, first, input={"n": 3}), _run(client, cached, input={"n": 4}),
            _run(client, cached, input={"n": 4})]
    answer = _list(client)

    assert [run["request_id"] for run in answer["data"]] == made[::-1]
    assert answer["next_until"] is None
    newest = answer["data"][0]
    assert newest["workflow"] == cached and newest["cache_hit"] is True and newest["status"] == "succeeded"
    assert "input" not in newest and "output" not in newest  # a summary, as the workflow's run list shows
    assert [run["workflow"] for run in answer["data"][2:]] == [first, second, first]


def test_another_accounts_runs_are_never_listed(client: Client, stack: Stack) -> None:
    ref = _ref("mine")
    client.upload(ref, QUICK)
    other = Client(client.base_url, stack.create_account(f"test-{uuid.uuid4().hex[:8]}"))
    other.upload(ref, QUICK)  # the same ref name in another account
    mine = _run(client, ref, input={"n": 1}, session_id="shared-session")
    theirs = _run(other, ref, input={"n": 2}, session_id="shared-session")

    assert _ids(client) == [mine]
    assert _ids(other) == [theirs]
    assert _ids(client, workflow=ref) == [mine]
    assert _ids(client, session_id="shared-session") == [mine]


def test_filters_by_workflow_status_session_and_queue_time(client: Client) -> None:
    one, two = _ref("one"), _ref("two")
    client.upload(one, QUICK)
    client.upload(two, QUICK)
    session = f"sess-{uuid.uuid4().hex[:8]}"
    a = _run(client, one, input={"n": 1}, session_id=session)
    b = _run(client, two, input={"fail": True}, session_id=session)
    c = _run(client, one, input={"n": 3})
    queued = {run["request_id"]: run["queued_at"] for run in _list(client)["data"]}

    assert _ids(client, workflow=one) == [c, a]
    assert _ids(client, status="failed") == [b]
    assert _ids(client, status="succeeded") == [c, a]
    assert _ids(client, status="failed,succeeded") == [c, b, a]
    assert _ids(client, status="queued,running") == []
    assert _ids(client, session_id=session) == [b, a]
    assert _ids(client, session_id=session, workflow=one) == [a]
    assert _ids(client, session_id=session, status="failed") == [b]
    assert _ids(client, since=queued[b]) == [c, b]  # since is inclusive
    assert _ids(client, until=queued[b]) == [a]  # until is exclusive
    assert _ids(client, since=queued[a], until=queued[c]) == [b, a]
    between = datetime.fromtimestamp((queued[a] + queued[b]) / 2, timezone.utc)  # a run apart: milliseconds at least
    assert _ids(client, since=between.isoformat()) == [c, b]  # with +00:00
    assert _ids(client, until=between.strftime("%Y-%m-%dT%H:%M:%S.%fZ")) == [a]
    assert _ids(client, workflow=_ref("never-uploaded")) == []


def test_cursor_pages_return_every_run_exactly_once(client: Client) -> None:
    ref = _ref("paged")
    client.upload(ref, QUICK)
    made = [_run(client, ref, input={"n": i, "fail": i % 3 == 0}) for i in range(7)]

    def pages(**params: Any) -> list[list[str]]:
        found, until = [], None
        for _ in range(20):
            answer = _list(client, limit=2, **params, **({"until": until} if until is not None else {}))
            found.append([run["request_id"] for run in answer["data"]])
            until = answer["next_until"]
            if until is None:
                return found
        raise AssertionError(f"no last page: {found}")

    every = pages()
    assert [len(page) for page in every] == [2, 2, 2, 1]
    assert sum(every, []) == made[::-1]
    succeeded = pages(status="succeeded")
    assert sum(succeeded, []) == [r for i, r in enumerate(made) if i % 3][::-1]
    assert max(len(page) for page in succeeded) <= 2


def test_runs_queued_at_one_instant_share_a_page_and_expired_ones_are_passed_over(client: Client,
                                                                                  stack_db: redis.Redis) -> None:
    owner = account_id(stack_db, client)
    store = RunStore(stack_db, ttl_seconds=600, runs_per_workflow=100)
    made = []
    for i, queued_at in enumerate([1000.5, 1000.5, 999.25, 999.25, 998.0, 998.0, 997.0]):
        made.append(f"req_{uuid.uuid4().hex}")
        store.record(RunRecord(request_id=made[-1], account=owner, workflow="written", status=RunStatus.SUCCEEDED,
                               queued_at=queued_at, finished_at=queued_at + 1))
    stack_db.delete(keys.run(made[-1]))  # its record expired; the account's index still names it

    pages, until = [], None
    for _ in range(10):
        answer = _list(client, limit=3, **({"until": until} if until is not None else {}))
        pages.append(sorted(run["request_id"] for run in answer["data"]))
        until = answer["next_until"]
        if until is None:
            break

    assert pages == [sorted(made[0:2]), sorted(made[2:4]), sorted(made[4:6])]


def test_bad_query_parameters_are_refused_naming_the_parameter(client: Client) -> None:
    for params, name in [({"since": "yesterday"}, "since"), ({"until": "2025-01-31T12:00:00"}, "until"),
                         ({"until": "nan"}, "until"), ({"status": "done"}, "status"),
                         ({"status": "succeeded,Failed"}, "status"), ({"limit": "0"}, "limit"),
                         ({"limit": "101"}, "limit"), ({"limit": "ten"}, "limit")]:
        response = client.get(RUNS, params=params)

        assert response.status_code == 400, (params, response.text)
        assert error_of(response)["param"] == name, params


def test_a_runs_input_and_messages_are_kept_with_the_request_secrets_redacted(client: Client) -> None:
    ref = _ref("kept")
    client.upload(ref, QUICK)
    secret = f"sk-live-{uuid.uuid4().hex}"
    request_id = _run(client, ref, input={"n": 1, "note": f"use {secret} here", secret: "as a key"},
                      messages=[{"role": "user", "content": f"my token is {secret}"}], secrets={"token": secret})

    response = client.get(f"{RUNS}/{request_id}")

    assert response.status_code == 200, response.text
    assert secret not in response.text
    run = response.json()["data"]
    assert run["input"] == {"n": 1, "note": "use [redacted] here", "[redacted]": "as a key"}
    assert run["messages"] == [{"role": "user", "content": "my token is [redacted]"}]
    assert run["http_calls"] == []


def test_an_input_over_the_record_limit_is_kept_as_a_note_of_its_size(client: Client) -> None:
    ref = _ref("big")
    client.upload(ref, QUICK)
    big = {"n": 1, "text": "x" * 70_000}
    request_id = _run(client, ref, input=big, messages=[{"role": "user", "content": "short"}])

    run = client.run(request_id)

    size = len(json.dumps(big, separators=(",", ":")))
    assert run["status"] == "succeeded"
    assert run["input"] == {"omitted": f"{size} bytes, over the record's limit of 65536"}
    assert run["messages"] == [{"role": "user", "content": "short"}]


def test_stats_count_a_workflows_runs_and_errors(client: Client) -> None:
    ref, other = _ref("counted"), _ref("other")
    client.upload(ref, QUICK)
    client.upload(other, QUICK)
    for body in ({"n": 1}, {"n": 2}, {"fail": True}, {"n": 4}):
        _run(client, ref, input=body)
    _run(client, other, input={"fail": True})

    response = client.get(f"/api/v1/workflows/{ref}/stats")

    assert response.status_code == 200, response.text
    stats = response.json()["data"]
    assert stats["hours"] == 24 and stats["runs"] == 4 and stats["errors"] == 1 and stats["error_rate"] == 0.25
    assert stats["sampled"] is False
    assert stats["p50_ms"] is not None and stats["p95_ms"] >= stats["p50_ms"] > 0
    assert len(stats["buckets"]) == 24 and stats["buckets"][-1]["runs"] == 4 and stats["buckets"][-1]["errors"] == 1
    assert sum(bucket["runs"] for bucket in stats["buckets"]) == 4
    one_hour = client.get(f"/api/v1/workflows/{ref}/stats", params={"hours": 1}).json()["data"]
    assert one_hour["hours"] == 1 and len(one_hour["buckets"]) == 1 and one_hour["runs"] == 4


def test_stats_refuse_hours_out_of_range_and_an_unknown_workflow(client: Client) -> None:
    ref = _ref("quiet")
    client.upload(ref, QUICK)

    empty = client.get(f"/api/v1/workflows/{ref}/stats", params={"hours": 168})
    assert empty.status_code == 200 and empty.json()["data"]["runs"] == 0
    assert len(empty.json()["data"]["buckets"]) == 168
    for hours in ("0", "169", "a day"):
        response = client.get(f"/api/v1/workflows/{ref}/stats", params={"hours": hours})
        assert response.status_code == 400 and error_of(response)["param"] == "hours", response.text
    missing = client.get(f"/api/v1/workflows/{_ref('missing')}/stats")
    assert missing.status_code == 404, missing.text
