"""Maitai's own keyword arguments on ctx.chat and ctx.agents are taken by flowpool, never sent to the provider.

The seed's docs tell scripts to pass ``session_id=ctx.session_id`` (and
document evaluation_enabled, metadata, fallback_config... as Maitai's own);
each call here goes to the stand-in vendor over loopback, and what it was sent
is read back from it.
"""
from __future__ import annotations

import uuid
from typing import Any

import pytest

from flowpool.tasks.maitai_params import MAITAI_KWARGS
from tests.helpers import Client
from tests.provider import StandInProvider

# A value for each of Maitai's own keywords, as a script written for Maitai might pass it.
MAITAI_VALUES: dict[str, Any] = {
    "session_id": "call-session-7", "metadata": {"source": "seed", "secretish": "not-for-the-provider"},
    "evaluation_enabled": False, "apply_corrections": True, "safe_mode": True, "callback": None,
    "server_side_inference": False, "fallback_config": {"strategy": "reactive", "timeout": 3},
    "reference_id": "ref-1", "assistant": False, "user_id": "user-9", "context_retrieval_enabled": True,
    "context_query": "orders", "fallback_model": "echo", "reasoning": {"effort": "low", "summary": True},
    "execution_mode": "reasoning", "high_performance": True, "max_iterations": 4,
}
TAKEN = sorted(set(MAITAI_KWARGS) - {"session_id"})

# Every keyword of MAITAI_VALUES as a Python literal, plus a real callback function (which cannot leave the
# sandbox), temperature and response_format (OpenAI's own, forwarded).
CALLS = """
from maitai_workflow import WorkflowContext

def on_eval(eval_response):
    print(eval_response)

KWARGS = {kwargs!r}

def execute(ctx: WorkflowContext):
    extra = dict(KWARGS, callback=on_eval, temperature=0.3, response_format={{"type": "json_object"}})
    chat = ctx.chat.completions.create(messages=[{{"role": "user", "content": "hi"}}], application="{app}",
                                       intent="answer", **extra)
    agent = ctx.agents.create("{agent}", messages=[{{"role": "user", "content": "agent hi"}}], **extra)
    return {{"chat": chat["choices"][0]["message"]["content"],
             "agent": agent["choices"][0]["message"]["content"]}}
"""


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _sent(provider: StandInProvider, model: str, request_id: str) -> list[dict[str, Any]]:
    return [r for r in provider.sent(model) if r["headers"].get("X-Flowpool-Request-Id") == request_id]


def _configure(client: Client, provider: StandInProvider, model: str) -> tuple[str, str]:
    """An application (intent ``answer``) and an endpoint agent, both on the stand-in's ``model``."""
    app, agent = _name("app"), _name("agent")
    put = client.request("PUT", f"/api/v1/applications/{app}",
                         json={"intents": {"answer": {"model": model, "base_url": provider.base_url}}})
    assert put.status_code == 201, put.text
    put = client.request("PUT", f"/api/v1/agents/{agent}", json={"base_url": provider.base_url, "model": model})
    assert put.status_code == 201, put.text
    return app, agent


def _invoke(client: Client, ref: str, **body: Any) -> dict[str, Any]:
    response = client.invoke(ref, **body)
    assert response.status_code == 200, response.text
    return response.json()


def test_maitais_own_kwargs_never_reach_the_provider_and_openais_are_forwarded(
        client: Client, provider: StandInProvider) -> None:
    assert set(MAITAI_VALUES) == MAITAI_KWARGS  # a value for every name flowpool takes
    app, agent = _configure(client, provider, "echo")
    ref = _name("kwargs")
    client.upload(ref, CALLS.format(kwargs=MAITAI_VALUES, app=app, agent=agent))
    body = _invoke(client, ref, input={}, session_id="run-session")
    assert body["output"] == {"chat": "echo: hi", "agent": "echo: agent hi"}
    chat, agent_call = _sent(provider, "echo", body["request_id"])
    for sent in (chat, agent_call):
        assert not set(sent["body"]) & MAITAI_KWARGS, sorted(set(sent["body"]) & MAITAI_KWARGS)
        assert sent["body"]["temperature"] == 0.3 and sent["body"]["response_format"] == {"type": "json_object"}
        assert sent["body"]["reasoning_effort"] == "low"  # reasoning.effort, in OpenAI's chat name
        assert sent["headers"]["X-Flowpool-Session-Id"] == "call-session-7"
        assert "not-for-the-provider" not in str(sent)
    records = client.run(body["request_id"])["model_calls"]
    assert [r["kind"] for r in records] == ["model", "agent"]
    for record in records:
        assert record["session_id"] == "call-session-7"
        assert record["taken_params"] == TAKEN  # names only: the callback's, too, though it stayed behind
        assert "not-for-the-provider" not in str(record)


def test_without_a_session_id_a_call_is_the_runs_session_and_takes_nothing(
        client: Client, provider: StandInProvider) -> None:
    app, _ = _configure(client, provider, "echo")
    ref = _name("plain")
    client.upload(ref, f"""
        def execute(ctx):
            return ctx.chat.completions.create(application="{app}", intent="answer", temperature=0.2,
                                               reasoning={{"effort": "high"}}, reasoning_effort="medium")["model"]
    """)
    body = _invoke(client, ref, input={}, session_id="the-runs-session")
    [sent] = _sent(provider, "echo", body["request_id"])
    assert sent["headers"]["X-Flowpool-Session-Id"] == "the-runs-session"
    assert sent["body"]["reasoning_effort"] == "medium"  # given itself, it wins over reasoning.effort
    assert "reasoning" not in sent["body"] and sent["body"]["temperature"] == 0.2
    [record] = client.run(body["request_id"])["model_calls"]
    assert record["session_id"] == "the-runs-session" and record["taken_params"] == ["reasoning"]


def test_a_strict_provider_answers_the_seeds_session_id_call(client: Client, provider: StandInProvider) -> None:
    app, agent = _configure(client, provider, "strict")
    ref = _name("seed-call")
    # As the seed's context page says: "Pass it through to ctx.chat/ctx.agents calls to correlate every step".
    client.upload(ref, f"""
        from maitai_workflow import WorkflowContext

        def execute(ctx: WorkflowContext):
            resp = ctx.chat.completions.create(
                messages=[{{"role": "user", "content": ctx.input["query"]}}],
                application="{app}", intent="answer", session_id=ctx.session_id, evaluation_enabled=False,
            )
            agent = ctx.agents.create("{agent}", session_id=ctx.session_id, metadata={{"k": "v"}})
            return {{"answer": resp["choices"][0]["message"]["content"], "agent": agent["model"]}}
    """)
    body = _invoke(client, ref, input={"query": "where is my parcel"}, session_id="sess-strict")
    assert body["output"] == {"answer": "echo: where is my parcel", "agent": "strict"}
    sent = _sent(provider, "strict", body["request_id"])
    assert len(sent) == 2 and all(s["headers"]["X-Flowpool-Session-Id"] == "sess-strict" for s in sent)


def test_the_strict_stand_in_refuses_what_openai_would(client: Client, provider: StandInProvider) -> None:
    """What the test above relies on: ``strict`` does answer 400 to a field OpenAI does not take."""
    app, _ = _configure(client, provider, "strict")
    ref = _name("unknown")
    client.upload(ref, f"""
        def execute(ctx):
            return ctx.chat.completions.create(application="{app}", intent="answer", not_an_openai_field=1)
    """)
    response = client.invoke(ref, input={})
    assert response.status_code >= 400
    assert "Unrecognized request argument supplied: not_an_openai_field" in response.text


@pytest.mark.parametrize("session_id", ["two\nlines", "x" * 201, 12.5])
def test_a_session_id_no_header_can_carry_fails_the_call_before_anything_is_sent(
        client: Client, provider: StandInProvider, session_id: Any) -> None:
    app, _ = _configure(client, provider, "echo")
    ref = _name("badsession")
    client.upload(ref, f"""
        from flowpool_workflow import WorkflowError

        def execute(ctx):
            try:
                ctx.chat.completions.create(application="{app}", intent="answer", session_id={session_id!r})
            except WorkflowError as exc:
                return str(exc)
            return "sent"
    """)
    body = _invoke(client, ref, input={})
    assert "session_id is" in body["output"]
    assert _sent(provider, "echo", body["request_id"]) == []
