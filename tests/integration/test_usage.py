"""An account's usage over HTTP, in `flowpool usage` and on /metrics, against runs really made on the stack:
successes, a failure, a cache hit and a model call through the stand-in vendor."""
from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

import pytest
import redis
import requests

from flowpool import keys
from flowpool.devstack import Stack
from tests.helpers import ECHO_WORKFLOW, FAILING_WORKFLOW, Client, eventually, ok, run_flowpool
from tests.provider import StandInProvider

ASKS = """
    def execute(ctx):
        resp = ctx.chat.completions.create(application_ref_name="{app}", action_type="answer",
                                           messages=[{{"role": "user", "content": ctx.input["q"]}}])
        return resp["choices"][0]["message"]["content"]
"""


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _usage(client: Client, **params: str) -> dict[str, Any]:
    response = client.get("/api/v1/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _metric(stack: Stack, name: str, **labels: str) -> float | None:
    """The value of one sample on /metrics; None when it is not there."""
    text = requests.get(f"{stack.api_url}/metrics", timeout=30).text
    shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{re.escape(name)}{re.escape('{' + shown + '}')} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


@pytest.fixture(scope="module")
def used(stack: Stack, provider: StandInProvider) -> dict[str, Any]:
    """A fresh account with runs made: two echoes that succeed, a cache hit of one, a failure, a model call."""
    assert stack.api_url is not None
    name = _name("usage")
    client = Client(stack.api_url, stack.create_account(name))
    refs = {"echo": _name("echo"), "fails": _name("fails"), "asks": _name("asks")}
    app = _name("app")
    put = client.request("PUT", f"/api/v1/applications/{app}",
                         json={"intents": {"answer": {"model": "echo", "base_url": provider.base_url}}})
    assert put.status_code == 201, put.text
    client.upload(refs["echo"], ECHO_WORKFLOW)
    client.upload(refs["fails"], FAILING_WORKFLOW)
    client.upload(refs["asks"], ASKS.format(app=app))
    answers = [client.invoke(refs["echo"], input={"text": "one"}), client.invoke(refs["echo"], input={"text": "two"}),
               client.invoke(refs["echo"], input={"text": "one"}), client.invoke(refs["fails"]),
               client.invoke(refs["asks"], input={"q": "where is my parcel"})]
    assert [a.status_code for a in answers] == [200, 200, 200, 500, 200], [a.text for a in answers]
    assert [a.headers.get("X-Cache") for a in answers[:3]] == ["MISS", "MISS", "HIT"]
    assert answers[4].json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    ran = [client.run(a.headers["X-Request-Id"]) for i, a in enumerate(answers) if i != 2]  # the hit never ran
    return {"name": name, "client": client, "refs": refs, "run_ms": sum(r["timings"]["run_ms"] for r in ran)}


def _sum_groups(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """What the groups add up to, in the shape of the totals (compute seconds apart: they are rounded)."""
    runs: dict[str, int] = {}
    models: dict[str, int] = {}
    for group in groups:
        for status, n in group["runs"].items():
            runs[status] = runs.get(status, 0) + n
        for model, n in group["tokens"]["by_model"].items():
            models[model] = models.get(model, 0) + n
    return {"runs": runs, "runs_total": sum(g["runs_total"] for g in groups),
            "tokens": {key: sum(g["tokens"][key] for g in groups) for key in ("total", "prompt", "completion")}
            | {"by_model": models}, "cache_hits": sum(g["cache_hits"] for g in groups)}


def test_usage_totals_match_the_runs_made(used: dict[str, Any]) -> None:
    data = _usage(used["client"])
    totals = data["totals"]
    assert totals["runs"] == {"failed": 1, "succeeded": 3} and totals["runs_total"] == 4
    assert totals["cache_hits"] == 1
    assert totals["tokens"] == {"total": 9, "prompt": 4, "completion": 5, "by_model": {"echo": 9}}
    # Compute is counted from each run's start to its end: what the runs' run_ms add up to, at most.
    assert 0 < totals["compute_seconds"] <= used["run_ms"] / 1000 + 0.001 * 4
    assert data["limits"] == {"concurrency": 0, "rpm": 0, "tokens_per_day": 0, "compute_seconds_per_day": 0}
    assert data["today"]["in_flight"] == 0
    assert data["today"]["tokens"] <= 9 and data["today"]["compute_seconds"] <= totals["compute_seconds"]


def test_usage_by_day_adds_up_to_the_totals(used: dict[str, Any]) -> None:
    data = _usage(used["client"], group_by="day")
    assert data["group_by"] == "day" and len(data["groups"]) == 30
    assert [g["day"] for g in data["groups"]] == sorted(g["day"] for g in data["groups"])
    assert data["groups"][-1]["day"] == data["to"]
    totals = dict(data["totals"])
    totals.pop("compute_seconds")
    assert _sum_groups(data["groups"]) == totals


def test_usage_by_workflow_counts_each_workflows_runs(used: dict[str, Any]) -> None:
    data = _usage(used["client"], group_by="workflow")
    refs = used["refs"]
    groups = {g["workflow"]: g for g in data["groups"]}
    assert set(groups) == set(refs.values())
    echo, fails, asks = groups[refs["echo"]], groups[refs["fails"]], groups[refs["asks"]]
    assert (echo["runs"], echo["cache_hits"], echo["tokens"]["total"]) == ({"succeeded": 2}, 1, 0)
    assert (fails["runs"], fails["cache_hits"]) == ({"failed": 1}, 0)
    assert asks["runs"] == {"succeeded": 1}
    assert asks["tokens"] == {"total": 9, "prompt": 4, "completion": 5, "by_model": {"echo": 9}}
    assert all(g["compute_seconds"] > 0 for g in groups.values())
    assert sum(g["compute_seconds"] for g in groups.values()) == pytest.approx(data["totals"]["compute_seconds"],
                                                                                 abs=0.002)


def test_another_accounts_usage_is_not_shown(client: Client, used: dict[str, Any]) -> None:
    data = _usage(client)
    assert data["totals"]["runs_total"] == 0 and data["totals"]["cache_hits"] == 0


@pytest.mark.parametrize("params, param", [
    ({"from": "2026-13-01"}, "from"), ({"to": "soon"}, "to"), ({"from": "2026-05-02", "to": "2026-05-01"}, "from"),
    ({"from": "2020-01-01", "to": "2026-01-01"}, "from"), ({"group_by": "hour"}, "group_by"),
])
def test_a_bad_usage_query_is_a_400_naming_the_parameter(client: Client, params: dict[str, str], param: str) -> None:
    response = client.get("/api/v1/usage", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_usage_needs_an_api_key(stack: Stack) -> None:
    assert requests.get(f"{stack.api_url}/api/v1/usage", timeout=30).status_code == 401


def test_metrics_count_each_accounts_compute_and_tokens_by_its_id(stack: Stack, stack_db: redis.Redis,
                                                                  used: dict[str, Any]) -> None:
    account_id = stack_db.hget(keys.ACCOUNTS, used["name"]).decode()
    compute = _usage(used["client"])["totals"]["compute_seconds"]
    assert _metric(stack, "flowpool_account_tokens_total", account=account_id) == 9
    assert _metric(stack, "flowpool_account_compute_seconds_total", account=account_id) == pytest.approx(
        compute, abs=0.001)
    assert _metric(stack, "flowpool_account_tokens_total", account=used["name"]) is None  # the public scrape: no names


def test_a_refusal_is_counted_by_limit_on_metrics(stack: Stack) -> None:
    assert stack.api_url is not None
    name = _name("refused")
    client = Client(stack.api_url, stack.create_account(name))
    ref = _name("echo")
    client.upload(ref, ECHO_WORKFLOW)
    before = _metric(stack, "flowpool_quota_refusals_total", limit="rpm") or 0
    put = requests.put(f"{stack.api_url}/api/v1/admin/accounts/{name}/limits", json={"rpm": 1}, timeout=30)
    assert put.status_code == 200, put.text
    assert client.invoke(ref, input={"text": "a"}).status_code == 200
    assert client.invoke(ref, input={"text": "a"}).status_code == 429
    eventually(lambda: (_metric(stack, "flowpool_quota_refusals_total", limit="rpm") or 0) >= before + 1,
               what="the refusal on /metrics")
    assert _usage(client)["limits"]["rpm"] == 1


def _cli(used: dict[str, Any], *args: str) -> str:
    client = used["client"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    env.update(FLOWPOOL_API_URL=client.base_url, FLOWPOOL_API_KEY=client.key)
    return ok(run_flowpool("usage", *args, env=env, timeout=60))


def test_flowpool_usage_json_prints_what_the_api_answers(used: dict[str, Any]) -> None:
    assert json.loads(_cli(used, "--json", "--group-by", "workflow")) == _usage(used["client"], group_by="workflow")
    days = {"from": "2026-01-01", "to": "2026-01-03"}
    shown = json.loads(_cli(used, "--json", "--from", days["from"], "--to", days["to"]))
    assert shown == _usage(used["client"], **days) and [g["day"] for g in shown["groups"]] == [
        "2026-01-01", "2026-01-02", "2026-01-03"]


def test_flowpool_usage_prints_a_table_with_the_totals(used: dict[str, Any]) -> None:
    shown = _cli(used, "--group-by", "workflow")
    refs = used["refs"]
    assert re.search(rf"^{re.escape(refs['echo'])} +2 +succeeded=2 +\S+ +0 +0 +0 +1$", shown, re.M), shown
    assert re.search(r"^total +4 +failed=1,succeeded=3 +\S+ +9 +4 +5 +1$", shown, re.M), shown
    assert "tokens by model: echo=9" in shown
    assert re.search(r"^today: .* 0 runs in flight \(no limit\); requests per minute: no limit$", shown, re.M), shown
