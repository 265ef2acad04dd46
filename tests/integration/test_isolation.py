"""One account never sees or spends another's anything: every route and every ctx call that names a resource.

Alice sets up a workflow, an application, an agent, a session and a cached
run; Mallory, a second account on the same stack, knows all their names and
ids and tries each way in. Every answer must be the same 404 (or an empty
list) Mallory would get for a name that does not exist, and Alice's cache
must never answer Mallory.
"""
from __future__ import annotations

import uuid
from typing import Any

import pytest

from flowpool.devstack import Stack
from tests.helpers import Client, error_of
from tests.provider import StandInProvider

SCRIPT = """
    def execute(ctx):
        ctx.emit("progress", "alice's chunk")
        return {"owner": "alice", "n": ctx.input.get("n")}
"""


@pytest.fixture
def alice(stack: Stack, provider: StandInProvider) -> dict[str, Any]:
    """Alice's account and what she made in it, by name and id."""
    assert stack.api_url is not None
    client = Client(stack.api_url, stack.create_account(f"alice-{uuid.uuid4().hex[:6]}"))
    client.upload("private", SCRIPT)
    app = {"intents": {"answer": {"model": "echo", "base_url": provider.base_url, "api_key_env": "STANDIN_API_KEY"}}}
    assert client.request("PUT", "/api/v1/applications/alices-app", json=app).status_code == 201
    assert client.request("PUT", "/api/v1/agents/alices-agent", json={"workflow": "private"}).status_code == 201
    response = client.invoke("private", input={"n": 1}, session_id="sess-alice-1")
    assert response.status_code == 200, response.text
    return {"client": client, "request_id": response.json()["request_id"]}


@pytest.fixture
def mallory(stack: Stack) -> Client:
    assert stack.api_url is not None
    return Client(stack.api_url, stack.create_account(f"mallory-{uuid.uuid4().hex[:6]}"))


def _not_found(response: Any, type_: str = "not_found") -> None:
    assert response.status_code == 404, response.text
    assert error_of(response)["type"] == type_


def _workflow_not_found(response: Any) -> None:
    _not_found(response, "invalid_request_error")  # the seed's 404 for a workflow
    assert error_of(response)["message"] == "Workflow not found: private"


def test_routes_naming_another_accounts_things_answer_as_if_they_did_not_exist(alice: dict[str, Any],
                                                                               mallory: Client) -> None:
    request_id = alice["request_id"]
    for path in ("/api/v1/workflows/private", "/api/v1/workflows/private/versions",
                 "/api/v1/workflows/private/runs"):
        _workflow_not_found(mallory.get(path, timeout=10))
    for path in (f"/api/v1/runs/{request_id}", f"/api/v1/runs/{request_id}/stream", "/api/v1/sessions/sess-alice-1",
                 "/api/v1/applications/alices-app", "/api/v1/agents/alices-agent"):
        _not_found(mallory.get(path, timeout=10))
    _workflow_not_found(mallory.post("/api/v1/workflows/private/activate", json={"version": "1.0.0"}))
    _workflow_not_found(mallory.request("DELETE", "/api/v1/workflows/private"))
    for path in ("/api/v1/workflows", "/api/v1/applications", "/api/v1/agents"):
        listed = mallory.get(path)
        assert listed.status_code == 200 and listed.json()["data"] == [], listed.text
    _workflow_not_found(mallory.invoke("private", input={"n": 1}))
    # Alice's things are untouched by all of that.
    owner = alice["client"]
    assert owner.get("/api/v1/workflows/private").status_code == 200
    assert owner.run(request_id)["status"] == "succeeded"


def test_mallorys_runs_cannot_reach_alices_workflows_agents_or_applications(alice: dict[str, Any],
                                                                          mallory: Client) -> None:
    mallory.upload("probe", """
        from flowpool_workflow import WorkflowError

        def execute(ctx):
            seen = {}
            for name, call in (
                    ("workflow", lambda: ctx.workflows.call("private", input={"n": 1})),
                    ("agent", lambda: ctx.agents.create("alices-agent", messages=[{"role": "user", "content": "x"}])),
                    ("application", lambda: ctx.chat.completions.create(application="alices-app"))):
                try:
                    seen[name] = call()
                except WorkflowError as exc:
                    seen[name] = type(exc).__name__ + ": " + str(exc)
            return seen
    """)
    response = mallory.invoke("probe", messages=[{"role": "user", "content": "hi"}])
    assert response.status_code == 200, response.text
    seen = response.json()["output"]
    assert seen == {"workflow": "WorkflowCallError: cannot call workflow 'private': Workflow not found: private",
                    "agent": "ModelError: no agent named 'alices-agent'",
                    "application": "ModelError: no application named 'alices-app'"}


def test_an_identical_request_of_another_account_is_never_answered_from_the_first_ones_cache(
        alice: dict[str, Any], mallory: Client) -> None:
    mallory.upload("private", SCRIPT.replace("alice", "mallory"))
    response = mallory.invoke("private", input={"n": 1})
    assert response.status_code == 200, response.text
    assert response.headers["X-Cache"] == "MISS"
    assert response.json()["output"] == {"owner": "mallory", "n": 1}
    again = alice["client"].invoke("private", input={"n": 1})
    assert again.headers["X-Cache"] == "HIT" and again.json()["output"] == {"owner": "alice", "n": 1}


SECRET_ECHO = """
    def execute(ctx):
        return {"echoed": ctx.secrets["token"], "n": ctx.input["n"]}
"""


def test_the_same_secret_sent_by_two_accounts_never_shares_a_run_or_a_cached_output(alice: dict[str, Any],
                                                                                   mallory: Client) -> None:
    secret = f"sk-shared-{uuid.uuid4().hex}"
    owner = alice["client"]
    owner.upload("echo-secret", SECRET_ECHO)
    mallory.upload("echo-secret", SECRET_ECHO)
    first = owner.invoke("echo-secret", input={"n": 1}, secrets={"token": secret})
    assert first.status_code == 200 and first.json()["output"] == {"echoed": secret, "n": 1}
    theirs = mallory.invoke("echo-secret", input={"n": 1}, secrets={"token": secret})
    assert theirs.status_code == 200, theirs.text
    assert theirs.headers["X-Cache"] == "MISS" and theirs.json()["request_id"] != first.json()["request_id"]
    assert owner.invoke("echo-secret", input={"n": 1}, secrets={"token": secret}).headers["X-Cache"] == "HIT"
