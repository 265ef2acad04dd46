"""Provider keys belong to the operator: accounts may name only the variables FLOWPOOL_PROVIDER_KEYS lists.

The stack's workers hold FLOWPOOL_TEST_CANARY in their environment (tests/conftest.py
TEST_ENV) and list only STANDIN_API_KEY: the canary's value must never reach a provider.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from flowpool.registry import Agent, Agents, Application, Applications
from tests.conftest import TEST_ENV
from tests.helpers import Client, account_id, error_of
from tests.provider import StandInProvider

CANARY = "FLOWPOOL_TEST_CANARY"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _canary_reached(provider: StandInProvider) -> bool:
    """Whether the canary's value is in any header or body the provider was sent."""
    value = TEST_ENV[CANARY]
    return any(value in json.dumps(sent["headers"]) or value in json.dumps(sent["body"]) for sent in provider.requests)


@pytest.mark.parametrize("variable", [CANARY, "FLOWPOOL_REDIS_URL", "PATH"])
def test_an_application_naming_an_unlisted_variable_is_a_400_naming_it(client: Client, provider: StandInProvider,
                                                                      variable: str) -> None:
    name = _name("thief")
    response = client.request("PUT", f"/api/v1/applications/{name}", json={"intents": {"answer": {
        "model": "echo", "base_url": provider.base_url, "api_key_env": variable}}})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert variable in error["message"] and "FLOWPOOL_PROVIDER_KEYS" in error["message"]
    assert error["param"] == "intents.answer.api_key_env"
    assert client.get(f"/api/v1/applications/{name}").status_code == 404


def test_a_fallback_naming_an_unlisted_variable_is_refused_too(client: Client, provider: StandInProvider) -> None:
    response = client.request("PUT", f"/api/v1/applications/{_name('thief')}", json={"intents": {"answer": {
        "model": "echo", "base_url": provider.base_url, "api_key_env": "STANDIN_API_KEY",
        "fallbacks": [{"model": "echo", "base_url": provider.base_url, "api_key_env": CANARY}]}}})
    assert response.status_code == 400, response.text
    assert CANARY in error_of(response)["message"]
    assert error_of(response)["param"] == "intents.answer.fallbacks.0.api_key_env"


def test_an_agent_naming_an_unlisted_variable_is_a_400_naming_it(client: Client, provider: StandInProvider) -> None:
    name = _name("thief")
    response = client.request("PUT", f"/api/v1/agents/{name}",
                              json={"base_url": provider.base_url, "model": "echo", "api_key_env": CANARY})
    assert response.status_code == 400, response.text
    assert CANARY in error_of(response)["message"] and error_of(response)["param"] == "api_key_env"
    assert client.request("PUT", f"/api/v1/agents/{name}", json={
        "base_url": provider.base_url, "model": "echo", "api_key_env": "STANDIN_API_KEY"}).status_code == 201


def test_a_stored_application_naming_an_unlisted_variable_fails_its_call_and_sends_nothing(
        client: Client, provider: StandInProvider, stack_db: redis.Redis) -> None:
    app, ref = _name("stale"), _name("asks")
    # Written straight to the registry, as an application stored before the operator narrowed the list.
    Applications(stack_db).put(account_id(stack_db, client), app, Application.model_validate({"intents": {"answer": {
        "model": "echo", "base_url": provider.base_url, "api_key_env": CANARY}}}))
    client.upload(ref, f"""
        def execute(ctx):
            return ctx.chat.completions.create(application="{app}", intent="answer")
    """)
    before = len(provider.requests)
    response = client.invoke(ref, input={})
    assert response.status_code == 500, response.text
    message = error_of(response)["message"]
    assert "ModelError" in message and CANARY in message and "FLOWPOOL_PROVIDER_KEYS" in message
    assert len(provider.requests) == before  # refused before any connection
    assert not _canary_reached(provider)
    [call] = client.run(error_of(response)["request_id"])["model_calls"]
    assert call["status"] == "error" and CANARY in call["error"]


def test_a_stored_agent_naming_an_unlisted_variable_fails_its_call_and_sends_nothing(
        client: Client, provider: StandInProvider, stack_db: redis.Redis) -> None:
    agent, ref = _name("stale"), _name("asks")
    Agents(stack_db).put(account_id(stack_db, client), agent,
                      Agent(base_url=provider.base_url, model="echo", api_key_env=CANARY))
    client.upload(ref, f"""
        from flowpool_workflow import ModelError

        def execute(ctx):
            try:
                ctx.agents.create("{agent}", messages=[{{"role": "user", "content": "hi"}}])
            except ModelError as exc:
                return {{"caught": str(exc)}}
            return {{"caught": None}}
    """)
    before = len(provider.requests)
    response = client.invoke(ref, input={})
    assert response.status_code == 200, response.text
    assert CANARY in response.json()["output"]["caught"]
    assert len(provider.requests) == before
    assert not _canary_reached(provider)


def test_a_listed_variable_and_a_request_secret_still_reach_the_provider(client: Client,
                                                                         provider: StandInProvider) -> None:
    app, ref, secret = _name("app"), _name("asks"), f"sk-user-{uuid.uuid4().hex}"
    intents: dict[str, Any] = {
        "env": {"model": "echo", "base_url": provider.base_url, "api_key_env": "STANDIN_API_KEY"},
        "secret": {"model": "echo", "base_url": provider.base_url, "api_key_secret": "mine"}}
    assert client.request("PUT", f"/api/v1/applications/{app}", json={"intents": intents}).status_code == 201
    client.upload(ref, f"""
        def execute(ctx):
            ctx.chat.completions.create(application="{app}", intent="env")
            ctx.chat.completions.create(application="{app}", intent="secret")
            return "ok"
    """)
    response = client.invoke(ref, input={}, secrets={"mine": secret})
    assert response.status_code == 200, response.text
    sent = [r["headers"]["Authorization"] for r in provider.requests
            if r["headers"].get("X-Flowpool-Request-Id") == response.json()["request_id"]]
    assert sent == [f"Bearer {TEST_ENV['STANDIN_API_KEY']}", f"Bearer {secret}"]


def test_a_key_bound_to_a_host_goes_only_there(client: Client, provider: StandInProvider, stack_db: redis.Redis) -> None:
    elsewhere = provider.base_url.replace("127.0.0.1", "127.0.0.2")  # never connected to: refused before
    response = client.request("PUT", f"/api/v1/applications/{_name('thief')}", json={"intents": {"answer": {
        "model": "echo", "base_url": elsewhere, "api_key_env": "STANDIN_BOUND_KEY"}}})
    assert response.status_code == 400, response.text
    assert "may only be sent to 127.0.0.1" in error_of(response)["message"]
    assert error_of(response)["param"] == "intents.answer.api_key_env"

    app, stale, ref = _name("bound"), _name("stale"), _name("asks")
    assert client.request("PUT", f"/api/v1/applications/{app}", json={"intents": {"answer": {
        "model": "echo", "base_url": provider.base_url, "api_key_env": "STANDIN_BOUND_KEY"}}}).status_code == 201
    Applications(stack_db).put(account_id(stack_db, client), stale, Application.model_validate({"intents": {"answer": {
        "model": "echo", "base_url": elsewhere, "api_key_env": "STANDIN_BOUND_KEY"}}}))
    client.upload(ref, f"""
        from flowpool_workflow import ModelError

        def execute(ctx):
            ctx.chat.completions.create(application="{app}", intent="answer")
            try:
                ctx.chat.completions.create(application="{stale}", intent="answer")
            except ModelError as exc:
                return str(exc)
    """)
    response = client.invoke(ref, input={})
    assert response.status_code == 200, response.text
    assert "may only be sent to 127.0.0.1" in response.json()["output"]
    sent = [r["headers"]["Authorization"] for r in provider.requests
            if r["headers"].get("X-Flowpool-Request-Id") == response.json()["request_id"]]
    assert sent == [f"Bearer {TEST_ENV['STANDIN_BOUND_KEY']}"]
