"""Accounts' limits set by an operator: ``GET|PUT /api/v1/admin/accounts/{name}/limits`` over HTTP on the shared
stack, and ``flowpool accounts limits`` / ``webhook-secret`` writing to the same Redis."""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import Any, Iterator

import pytest
import requests

from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer
from tests.conftest import second_api
from tests.helpers import ok, run_flowpool

ALL = ["concurrency", "rpm", "tokens_per_day", "compute_seconds_per_day"]
NO_LIMITS = {name: 0 for name in ALL}  # the shared stack sets no FLOWPOOL_DEFAULT_*


@pytest.fixture
def account(stack: Stack) -> str:
    """The name of a fresh account on the shared stack."""
    name = f"limits-{uuid.uuid4().hex[:8]}"
    stack.create_account(name)
    return name


def _url(stack: Stack, name: str) -> str:
    assert stack.api_url is not None
    return f"{stack.api_url}/api/v1/admin/accounts/{name}/limits"


def _put(stack: Stack, name: str, body: Any) -> requests.Response:
    return requests.put(_url(stack, name), json=body, timeout=30)


def _data(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_a_new_account_follows_every_default(stack: Stack, account: str) -> None:
    # From loopback with no FLOWPOOL_ADMIN_TOKEN set: no token needed.
    assert _data(requests.get(_url(stack, account), timeout=30)) == {
        "account": account, "limits": NO_LIMITS, "defaults": ALL}


def test_put_sets_some_limits_get_shows_them_and_null_puts_one_back_to_the_default(stack: Stack,
                                                                                   account: str) -> None:
    answer = _data(_put(stack, account, {"concurrency": 3, "tokens_per_day": 50_000}))
    expected = {"account": account, "limits": {**NO_LIMITS, "concurrency": 3, "tokens_per_day": 50_000},
                "defaults": ["rpm", "compute_seconds_per_day"]}
    assert answer == expected
    assert _data(requests.get(_url(stack, account), timeout=30)) == expected

    # A limit left out stays; null puts one back to the default; an own 0 is "no limit", not the default.
    answer = _data(_put(stack, account, {"concurrency": None, "rpm": 0}))
    assert answer["limits"] == {**NO_LIMITS, "tokens_per_day": 50_000}
    assert answer["defaults"] == ["concurrency", "compute_seconds_per_day"]
    assert _data(requests.get(_url(stack, account), timeout=30)) == answer


@pytest.mark.parametrize(("body", "param"), [
    ({"concurrency": -1}, "concurrency"),
    ({"rpm": "60"}, "rpm"),
    ({"rpm": 1.5}, "rpm"),
    ({"tokens_per_day": True}, "tokens_per_day"),
    ({"compute_seconds_per_day": 10**13}, "compute_seconds_per_day"),
    ({"burst": 5}, "burst"),
    ({}, "body"),
    ([1], None),
])
def test_a_bad_body_is_a_400_naming_the_field_and_changes_nothing(stack: Stack, account: str, body: Any,
                                                                   param: str | None) -> None:
    _data(_put(stack, account, {"concurrency": 2}))
    response = _put(stack, account, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param and param in error["message"]
    assert _data(requests.get(_url(stack, account), timeout=30))["limits"] == {**NO_LIMITS, "concurrency": 2}


def test_a_body_that_is_not_json_is_a_400(stack: Stack, account: str) -> None:
    response = requests.put(_url(stack, account), data=b"concurrency=3", timeout=30,
                            headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_an_unknown_account_is_a_404_for_get_and_put(stack: Stack) -> None:
    name = f"nobody-{uuid.uuid4().hex[:8]}"
    for response in (requests.get(_url(stack, name), timeout=30), _put(stack, name, {"concurrency": 1})):
        assert response.status_code == 404, response.text
        assert name in response.json()["error"]["message"]


def test_openapi_marks_the_routes_as_operator_routes_with_the_put_body(stack: Stack) -> None:
    spec = requests.get(f"{stack.api_url}/openapi.json", timeout=30).json()
    path = spec["paths"]["/api/v1/admin/accounts/{name}/limits"]
    assert path["get"]["security"] == path["put"]["security"] == [{"adminToken": []}]
    body = path["put"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(spec["components"]["schemas"][body]["properties"]) == set(ALL)


@pytest.fixture
def guarded_api(redis_server: RedisServer, stack: Stack) -> Iterator[tuple[str, str]]:
    """A second API on the shared stack's Redis with FLOWPOOL_ADMIN_TOKEN set."""
    token = f"admin-{uuid.uuid4().hex}"
    with second_api(redis_server, FLOWPOOL_ADMIN_TOKEN=token) as api:
        assert api.api_url is not None
        yield api.api_url, token


def test_with_an_admin_token_set_only_its_bearer_reads_or_sets_limits(guarded_api: tuple[str, str], stack: Stack,
                                                                      account: str) -> None:
    url, token = guarded_api
    route = f"{url}/api/v1/admin/accounts/{account}/limits"
    key = stack.create_account(account)  # the account's own key is no operator token
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-enough-length"}, {"x-api-key": key},
                    {"Authorization": f"Bearer {key}"}, {"Authorization": token}):
        assert requests.get(route, headers=headers, timeout=30).status_code == 401, headers
        refused = requests.put(route, json={"concurrency": 1}, headers=headers, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error", headers
    allowed = {"Authorization": f"Bearer {token}"}
    assert _data(requests.put(route, json={"concurrency": 1}, headers=allowed, timeout=30))["limits"]["concurrency"] == 1
    assert _data(requests.get(route, headers=allowed, timeout=30))["defaults"] == ALL[1:]
    # Both APIs share the Redis: the limit the one set is what the other answers.
    assert _data(requests.get(_url(stack, account), timeout=30))["limits"]["concurrency"] == 1


# The command line, on the shared stack's Redis.

def _cli_env(stack: Stack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    # A data directory no dev runs on: the commands must not find a `flowpool dev` someone runs in the checkout.
    no_dev = os.path.join(tempfile.gettempdir(), "flowpool-tests-no-dev-here")
    env.update({"FLOWPOOL_REDIS_URL": stack.redis_url, "FLOWPOOL_DATA_DIR": no_dev})
    return env


def test_cli_limits_sets_what_the_route_then_shows_and_prints_them(stack: Stack, account: str) -> None:
    env = _cli_env(stack)
    done = run_flowpool("accounts", "limits", account, "--concurrency", "4", "--rpm", "120", env=env)
    shown = ok(done)
    assert "set concurrency, rpm of account " + account in done.stderr and "Redis: " in done.stderr
    assert f"account {account} (" in shown
    assert [line.split() for line in shown.splitlines()[1:]] == [
        ["concurrency", "4", "own"], ["rpm", "120", "own"], ["tokens_per_day", "no", "limit", "default"],
        ["compute_seconds_per_day", "no", "limit", "default"]]
    assert _data(requests.get(_url(stack, account), timeout=30)) == {
        "account": account, "limits": {**NO_LIMITS, "concurrency": 4, "rpm": 120},
        "defaults": ["tokens_per_day", "compute_seconds_per_day"]}

    # 'default' puts one back; no option only prints, and --json prints what the route answers.
    ok(run_flowpool("accounts", "limits", account, "--rpm", "default", env=env))
    printed = json.loads(ok(run_flowpool("accounts", "limits", account, "--json", env=env)))
    assert printed == _data(requests.get(_url(stack, account), timeout=30))
    assert printed["limits"]["rpm"] == 0 and printed["defaults"] == ALL[1:]


def test_cli_limits_refuses_a_bad_value_and_an_unknown_account(stack: Stack, account: str) -> None:
    env = _cli_env(stack)
    bad = run_flowpool("accounts", "limits", account, "--concurrency", "-1", env=env)
    assert bad.returncode == 2 and "neither an integer" in bad.stderr and bad.stdout == ""
    unknown_name = f"nobody-{uuid.uuid4().hex[:8]}"
    for args in (("limits", unknown_name), ("limits", unknown_name, "--rpm", "3"), ("webhook-secret", unknown_name)):
        done = run_flowpool("accounts", *args, env=env)
        assert done.returncode == 1 and f"no account named {unknown_name!r}" in done.stderr, args
        assert done.stdout == "" and "Traceback" not in done.stderr
    assert _data(requests.get(_url(stack, account), timeout=30))["defaults"] == ALL


def test_cli_webhook_secret_prints_the_same_secret_alone_until_rotated(stack: Stack, account: str) -> None:
    env = _cli_env(stack)
    first = run_flowpool("accounts", "webhook-secret", account, env=env)
    secret = ok(first)
    assert secret.startswith("whsec_") and secret.endswith("\n") and secret.count("\n") == 1  # stdout: the secret
    assert f"webhook secret of account {account}" in first.stderr
    assert ok(run_flowpool("accounts", "webhook-secret", account, env=env)) == secret

    rotated = ok(run_flowpool("accounts", "webhook-secret", account, "--rotate", env=env))
    assert rotated.startswith("whsec_") and rotated != secret
    assert ok(run_flowpool("accounts", "webhook-secret", account, env=env)) == rotated
