"""Applications, and monitored model calls from scripts, against the stand-in vendor over loopback."""
from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from tests.helpers import Client, error_of
from tests.provider import StandInProvider


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def _put_app(client: Client, name: str, intents: dict[str, Any], **extra: Any) -> requests.Response:
    return client.request("PUT", f"/api/v1/applications/{name}", json={"intents": intents, **extra})


ASKS = """
    from flowpool_workflow import WorkflowContext

    APPLICATION = "{app}"

    def execute(ctx: WorkflowContext):
        resp = ctx.chat.completions.create(intent="answer", messages=[{{"role": "user", "content": ctx.input["q"]}}])
        return {{"answer": resp["choices"][0]["message"]["content"], "usage": resp["usage"]}}
"""


def test_put_get_and_list_applications(client: Client, provider: StandInProvider) -> None:
    name = _name("support")
    intents = {"answer": {"model": "echo", "base_url": provider.base_url, "params": {"temperature": 0.1},
                          "fallbacks": [{"model": "echo", "base_url": provider.base_url}]}}
    created = _put_app(client, name, intents, default_intent="answer")
    assert created.status_code == 201, created.text
    assert _put_app(client, name, intents).status_code == 200  # replaced
    got = client.get(f"/api/v1/applications/{name}").json()["data"]
    assert got["name"] == name and got["intents"]["answer"]["model"] == "echo"
    assert got["intents"]["answer"]["fallbacks"][0]["base_url"] == provider.base_url
    listed = client.get("/api/v1/applications").json()
    assert [a["name"] for a in listed["data"]] == [name] and listed["pagination"]["total"] == 1
    assert client.get(f"/api/v1/applications/{_name('missing')}").status_code == 404


@pytest.mark.parametrize("body, field", [
    ({"intents": {"answer": {"base_url": "http://127.0.0.1:1/v1"}}}, "intents.answer.model"),
    ({"intents": {"answer": {"model": "m", "base_url": "ftp://x"}}}, "intents.answer.base_url"),
    ({"intents": {"answer": {"model": "m", "base_url": "http://x/v1"}}, "default_intent": "other"}, "default_intent"),
    ({"intents": {}}, "intents"),
])
def test_a_malformed_application_is_a_400_naming_the_field(client: Client, body: dict[str, Any], field: str) -> None:
    response = client.request("PUT", f"/api/v1/applications/{_name('bad')}", json=body)
    assert response.status_code == 400
    assert field.split(".")[0] in error_of(response)["message"]


def test_a_model_call_is_routed_by_intent_monitored_and_summed_into_usage(client: Client,
                                                                        provider: StandInProvider) -> None:
    app, ref = _name("app"), _name("asks")
    _put_app(client, app, {"answer": {"model": "echo", "base_url": provider.base_url, "api_key_env": "STANDIN_API_KEY"}})
    client.upload(ref, ASKS.format(app=app))
    body = _ok(client.invoke(ref, input={"q": "where is my parcel"}, session_id="sess-42"))
    assert body["output"]["answer"] == "echo: where is my parcel"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    sent = [r for r in provider.sent("echo") if r["headers"].get("X-Flowpool-Request-Id") == body["request_id"]]
    assert len(sent) == 1
    assert sent[0]["headers"]["X-Flowpool-Session-Id"] == "sess-42"
    assert sent[0]["headers"]["Authorization"] == "Bearer sk-from-the-worker-environment"
    [call] = client.run(body["request_id"])["model_calls"]
    assert call["application"] == app and call["intent"] == "answer" and call["model"] == "echo"
    assert call["provider_host"] == "127.0.0.1" and call["status"] == "ok" and call["fallback"] == 0
    assert call["prompt_tokens"] == 4 and call["completion_tokens"] == 5
    assert call["latency_ms"] > 0 and call["ttft_ms"] > 0


def test_messages_default_to_the_requests_messages_and_unknown_kwargs_are_forwarded(
        client: Client, provider: StandInProvider) -> None:
    app, ref = _name("app"), _name("chat")
    _put_app(client, app, {"answer": {"model": "echo", "base_url": provider.base_url, "params": {"top_p": 0.5}}})
    client.upload(ref, f"""
        def execute(ctx):
            resp = ctx.chat.completions.create(application_ref_name="{app}", action_type="answer", seed=7)
            return resp["choices"][0]["message"]["content"]
    """)
    body = _ok(client.invoke(ref, messages=[{"role": "user", "content": "hello there"}]))
    assert body["output"] == "echo: hello there" == body["choices"][0]["message"]["content"]
    [sent] = [r for r in provider.sent("echo") if r["headers"].get("X-Flowpool-Request-Id") == body["request_id"]]
    assert sent["body"]["seed"] == 7 and sent["body"]["top_p"] == 0.5
    assert sent["body"]["messages"] == [{"role": "user", "content": "hello there"}]


def test_a_failing_primary_is_retried_then_the_fallback_answers(client: Client, provider: StandInProvider) -> None:
    app, ref = _name("app"), _name("fallback")
    _put_app(client, app, {"answer": {"model": "fail", "base_url": provider.base_url,
                                      "fallbacks": [{"model": "echo", "base_url": provider.base_url}]}})
    client.upload(ref, ASKS.format(app=app))
    body = _ok(client.invoke(ref, input={"q": "hi"}))
    assert body["output"]["answer"] == "echo: hi"
    failed, answered = client.run(body["request_id"])["model_calls"]
    assert (failed["model"], failed["status"], failed["fallback"], failed["attempts"]) == ("fail", "error", 0, 3)
    assert "HTTP 500" in failed["error"]
    # The failed route says how long it took, its retries included; it never gave a first token.
    assert failed["latency_ms"] > 0 and failed["ttft_ms"] is None
    assert (answered["model"], answered["status"], answered["fallback"]) == ("echo", "ok", 1)


def test_a_rate_limited_call_is_retried_with_backoff(client: Client, provider: StandInProvider) -> None:
    app, ref, model = _name("app"), _name("ratelimit"), f"ratelimit-1-{uuid.uuid4().hex[:6]}"
    _put_app(client, app, {"answer": {"model": model, "base_url": provider.base_url}})
    client.upload(ref, ASKS.format(app=app))
    body = _ok(client.invoke(ref, input={"q": "hi"}))
    [call] = client.run(body["request_id"])["model_calls"]
    assert call["status"] == "ok" and call["attempts"] == 2
    assert len(provider.sent(model)) == 2


def test_when_every_route_fails_the_script_gets_a_catchable_model_error(client: Client,
                                                                         provider: StandInProvider) -> None:
    app, ref = _name("app"), _name("allfail")
    _put_app(client, app, {"answer": {"model": "fail", "base_url": provider.base_url,
                                      "fallbacks": [{"model": "notjson", "base_url": provider.base_url}]}})
    client.upload(ref, f"""
        from flowpool_workflow import ModelError

        def execute(ctx):
            try:
                ctx.chat.completions.create(application="{app}", intent="answer")
            except ModelError as exc:
                return {{"caught": str(exc)}}
            return {{"caught": None}}
    """)
    caught = _ok(client.invoke(ref, input={}))["output"]["caught"]
    assert "every route" in caught and "fail" in caught and "notjson" in caught


def test_an_uncaught_model_error_is_a_500_naming_it(client: Client, provider: StandInProvider) -> None:
    app, ref = _name("app"), _name("uncaught")
    _put_app(client, app, {"answer": {"model": "fail", "base_url": provider.base_url}})
    client.upload(ref, ASKS.format(app=app))
    response = client.invoke(ref, input={"q": "hi"})
    assert response.status_code == 500
    assert "ModelError" in error_of(response)["message"]


def test_a_stalled_provider_times_out_inside_the_runs_budget(client: Client, provider: StandInProvider) -> None:
    app, ref = _name("app"), _name("stall")
    _put_app(client, app, {"answer": {"model": "slow-4000", "base_url": provider.base_url}})
    client.upload(ref, ASKS.format(app=app), timeout_seconds=1)
    response = client.invoke(ref, input={"q": "hi"}, timeout=20)
    assert response.status_code == 408, response.text
    run = client.run(error_of(response)["request_id"])
    assert run["status"] == "timed_out"


def test_a_streamed_model_call_yields_chunks_as_the_provider_sends_them(client: Client,
                                                                          provider: StandInProvider) -> None:
    app, ref = _name("app"), _name("stream")
    _put_app(client, app, {"answer": {"model": "echo", "base_url": provider.base_url}})
    client.upload(ref, f"""
        def execute(ctx):
            chunks = list(ctx.chat.completions.create(application="{app}", intent="answer", stream=True,
                                                      messages=[{{"role": "user", "content": "one two three"}}]))
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            return {{"text": text, "chunks": len(chunks)}}
    """)
    body = _ok(client.invoke(ref, input={}))
    assert body["output"] == {"text": "echo: one two three", "chunks": 5}
    assert body["usage"]["total_tokens"] == 3 + 4
    [call] = client.run(body["request_id"])["model_calls"]
    assert call["stream"] is True and call["status"] == "ok" and call["ttft_ms"] <= call["latency_ms"]


def test_a_streamed_model_call_whose_primary_fails_before_streaming_falls_back(client: Client,
                                                                               provider: StandInProvider) -> None:
    app, ref = _name("app"), _name("streamfallback")
    _put_app(client, app, {"answer": {"model": "fail", "base_url": provider.base_url,
                                      "fallbacks": [{"model": "echo", "base_url": provider.base_url}]}})
    client.upload(ref, f"""
        def execute(ctx):
            chunks = list(ctx.chat.completions.create(application="{app}", intent="answer", stream=True,
                                                      messages=[{{"role": "user", "content": "one two"}}]))
            return {{"text": "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)}}
    """)
    body = _ok(client.invoke(ref, input={}))
    assert body["output"] == {"text": "echo: one two"}
    failed, answered = client.run(body["request_id"])["model_calls"]
    assert (failed["model"], failed["status"], failed["fallback"]) == ("fail", "error", 0)
    assert failed["latency_ms"] > 0 and failed["ttft_ms"] is None
    assert (answered["model"], answered["status"], answered["fallback"], answered["stream"]) == ("echo", "ok", 1, True)


def test_the_provider_key_can_come_from_a_request_secret_and_is_kept_nowhere(client: Client,
                                                                              provider: StandInProvider) -> None:
    app, ref, secret = _name("app"), _name("secretkey"), f"sk-user-{uuid.uuid4().hex}"
    _put_app(client, app, {"answer": {"model": "echo", "base_url": provider.base_url, "api_key_secret": "openai"}})
    client.upload(ref, ASKS.format(app=app))
    body = _ok(client.invoke(ref, input={"q": "hi"}, secrets={"openai": secret}))
    [sent] = [r for r in provider.sent("echo") if r["headers"].get("X-Flowpool-Request-Id") == body["request_id"]]
    assert sent["headers"]["Authorization"] == f"Bearer {secret}"
    assert secret not in client.get(f"/api/v1/runs/{body['request_id']}").text


def test_a_provider_on_a_loopback_address_the_operator_did_not_allow_is_refused(client: Client,
                                                                                 provider: StandInProvider) -> None:
    app, ref = _name("app"), _name("ssrf")
    # Only 127.0.0.1/32 is allowed: 127.0.0.2 is loopback too, and refused before any connection.
    _put_app(client, app, {"answer": {"model": "echo", "base_url": f"http://127.0.0.2:{provider.port}/v1"}})
    client.upload(ref, ASKS.format(app=app))
    before = len(provider.requests)
    response = client.invoke(ref, input={"q": "hi"})
    assert response.status_code == 500
    message = error_of(response)["message"]
    assert "127.0.0.2" in message and "loopback" in message and "FLOWPOOL_EGRESS_ALLOW" in message
    assert len(provider.requests) == before


def test_a_script_without_application_gets_a_clear_model_error(client: Client) -> None:
    ref = _name("noapp")
    client.upload(ref, """
        def execute(ctx):
            return ctx.chat.completions.create(intent="answer")
    """)
    response = client.invoke(ref, input={})
    assert response.status_code == 500
    assert "no application" in error_of(response)["message"]


def test_a_session_lists_its_runs_and_their_model_calls(client: Client, provider: StandInProvider) -> None:
    app, ref, session = _name("app"), _name("asks"), _name("session")
    _put_app(client, app, {"answer": {"model": "echo", "base_url": provider.base_url}})
    client.upload(ref, ASKS.format(app=app))
    first = _ok(client.invoke(ref, input={"q": "one"}, session_id=session))
    second = _ok(client.invoke(ref, input={"q": "two"}, session_id=session))
    hit = _ok(client.invoke(ref, input={"q": "one"}, session_id=session))  # a cache hit belongs to the session too
    _ok(client.invoke(ref, input={"q": "elsewhere"}, session_id=_name("other")))
    body = client.get(f"/api/v1/sessions/{session}").json()
    assert [r["request_id"] for r in body["data"]["runs"]] == [first["request_id"], second["request_id"],
                                                               hit["request_id"]]
    assert [c["status"] for c in body["data"]["model_calls"]] == ["ok", "ok"]
    assert body["pagination"]["total"] == 3
    assert client.get(f"/api/v1/sessions/{_name('none')}").status_code == 404
