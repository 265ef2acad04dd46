"""ctx.workflows.call and ctx.agents.create through the whole stack."""
from __future__ import annotations

import uuid
from typing import Any

import requests

from tests.helpers import Client, error_of
from tests.provider import StandInProvider


def _ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def _names(*prefixes: str) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"{p}-{tag}" for p in prefixes]


def test_a_router_calls_other_workflows_inline_and_each_call_is_recorded(client: Client,
                                                                         provider: StandInProvider) -> None:
    app, upper, ask, router = _names("app", "upper", "ask", "router")
    client.request("PUT", f"/api/v1/applications/{app}",
                   json={"intents": {"answer": {"model": "echo", "base_url": provider.base_url}}})
    client.upload(upper, """
        INPUT_SCHEMA = {"text": {"type": "string", "required": True}}

        def execute(ctx):
            return {"upper": ctx.input["text"].upper()}
    """)
    client.upload(ask, f"""
        APPLICATION = "{app}"

        def execute(ctx):
            resp = ctx.chat.completions.create(intent="answer")
            return resp["choices"][0]["message"]["content"]
    """)
    client.upload(router, f"""
        def execute(ctx):
            shout = ctx.workflows.call("{upper}", input={{"text": ctx.input["text"]}})
            answer = ctx.workflows.call("{ask}", messages=[{{"role": "user", "content": "two words"}}])
            return {{"shout": shout["upper"], "answer": answer}}
    """)
    body = _ok(client.invoke(router, input={"text": "hello"}))
    assert body["output"] == {"shout": "HELLO", "answer": "echo: two words"}
    assert body["usage"]["total_tokens"] == 2 + 3  # the nested model call counts for the caller
    run = client.run(body["request_id"])
    assert [(c["workflow"], c["status"], c["caller"]) for c in run["workflow_calls"]] == \
        [(upper, "ok", router), (ask, "ok", router)]
    [model_call] = run["model_calls"]
    assert model_call["workflow"] == ask and model_call["status"] == "ok"
    assert client.get(f"/api/v1/workflows/{upper}/runs").json()["pagination"]["total"] == 0  # no queue slot taken


def test_a_call_cycle_is_refused_with_the_chain(client: Client) -> None:
    a, b = _names("ping", "pong")
    for me, other in ((a, b), (b, a)):
        client.upload(me, f"""
            def execute(ctx):
                return ctx.workflows.call("{other}", input={{}})
        """)
    response = client.invoke(a, input={})
    assert response.status_code == 500
    message = error_of(response)["message"]
    assert "WorkflowCallError" in message and f"call cycle: {a} -> {b} -> {a}" in message


def test_calls_nest_at_most_the_depth_limit(client: Client) -> None:
    chain = _names(*(f"level{i}" for i in range(8)))
    for here, there in zip(chain, chain[1:]):
        client.upload(here, f"""
            def execute(ctx):
                return ctx.workflows.call("{there}", input={{}})
        """)
    client.upload(chain[-1], "def execute(ctx):\n    return 'bottom'\n")
    response = client.invoke(chain[0], input={})
    assert response.status_code == 500
    assert "at most 5 deep" in error_of(response)["message"]


def test_calling_an_unknown_workflow_or_with_bad_input_raises_in_the_caller(client: Client) -> None:
    caller, strict = _names("caller", "strict")
    client.upload(strict, """
        INPUT_SCHEMA = {"n": {"type": "integer", "required": True}}

        def execute(ctx):
            return ctx.input["n"]
    """)
    client.upload(caller, f"""
        from flowpool_workflow import WorkflowCallError

        def execute(ctx):
            errors = []
            for ref, payload in (("nope-{uuid.uuid4().hex[:4]}", {{}}), ("{strict}", {{"n": "x"}})):
                try:
                    ctx.workflows.call(ref, input=payload)
                except WorkflowCallError as exc:
                    errors.append(str(exc))
            return errors
    """)
    unknown, bad_input = _ok(client.invoke(caller, input={}))["output"]
    assert "Workflow not found: nope-" in unknown
    assert "'n'" in bad_input and "integer" in bad_input


def test_a_failing_callee_fails_the_call_and_an_uncaught_failure_is_a_500(client: Client) -> None:
    caller, broken = _names("caller", "broken")
    client.upload(broken, "def execute(ctx):\n    raise ValueError('inner boom')\n")
    client.upload(caller, f"def execute(ctx):\n    return ctx.workflows.call('{broken}', input={{}})\n")
    response = client.invoke(caller, input={})
    assert response.status_code == 500
    message = error_of(response)["message"]
    assert "WorkflowCallError" in message and "ValueError: inner boom" in message


def test_a_nested_call_runs_under_the_callers_time_budget(client: Client) -> None:
    caller, sleeper = _names("caller", "sleeper")
    client.upload(sleeper, "import time\ndef execute(ctx):\n    time.sleep(10)\n    return 1\n", timeout_seconds=30)
    client.upload(caller, f"def execute(ctx):\n    return ctx.workflows.call('{sleeper}', input={{}})\n",
                  timeout_seconds=1)
    response = client.invoke(caller, input={}, timeout=20)
    assert response.status_code == 408, response.text


def test_agents_answer_from_an_endpoint_or_a_workflow(client: Client, provider: StandInProvider) -> None:
    helper, caller = _names("helper", "caller")
    assert client.request("PUT", f"/api/v1/agents/echoer-{helper}",
                          json={"base_url": provider.base_url, "model": "echo"}).status_code == 201
    assert client.request("PUT", f"/api/v1/agents/wf-{helper}", json={"workflow": helper}).status_code == 201
    client.upload(helper, """
        def execute(ctx):
            return {"heard": ctx.messages[-1]["content"]}
    """)
    client.upload(caller, f"""
        def execute(ctx):
            a = ctx.agents.create("echoer-{helper}", messages=[{{"role": "user", "content": "ping"}}])
            b = ctx.agents.create("wf-{helper}")
            return {{"endpoint": a["choices"][0]["message"]["content"], "workflow": b["output"]}}
    """)
    body = _ok(client.invoke(caller, messages=[{"role": "user", "content": "from the caller"}]))
    assert body["output"] == {"endpoint": "echo: ping", "workflow": {"heard": "from the caller"}}
    run = client.run(body["request_id"])
    [agent_call] = run["model_calls"]
    assert agent_call["kind"] == "agent" and agent_call["agent"] == f"echoer-{helper}" and agent_call["status"] == "ok"
    assert [c["workflow"] for c in run["workflow_calls"]] == [helper]


def test_an_agent_is_an_endpoint_or_a_workflow_not_both(client: Client, provider: StandInProvider) -> None:
    response = client.request("PUT", "/api/v1/agents/both",
                              json={"base_url": provider.base_url, "workflow": "x"})
    assert response.status_code == 400
    assert "either a base_url" in error_of(response)["message"]
    assert client.get("/api/v1/agents/missing").status_code == 404
