"""What a run's record keeps of its calls for the timeline: ctx.http requests, nested workflow and model calls."""
from __future__ import annotations

import socket
import uuid
from typing import Any, Iterator

import pytest

from tasks.outbound import MAX_RECORDED_HTTP_CALLS, MAX_TARGET_CHARS
from tests.helpers import Client
from tests.provider import StandInProvider


def _names(*prefixes: str) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"{p}-{tag}" for p in prefixes]


def _run(client: Client, script: str, **body: Any) -> tuple[Any, dict[str, Any]]:
    """Upload ``script``, run it, and answer its output and its full record."""
    [ref] = _names("calls")
    client.upload(ref, script)
    response = client.invoke(ref, **({"input": {}} | body))
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer["output"], client.run(answer["request_id"])


def _within_run(run: dict[str, Any], started_at: float) -> bool:
    return run["started_at"] <= started_at <= run["finished_at"]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused, and nothing else can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_an_http_call_is_recorded_with_its_path_and_not_its_query(client: Client, provider: StandInProvider) -> None:
    output, run = _run(client, f"""
        def execute(ctx):
            r = ctx.http.get("{provider.origin}/doc/manual?token=tok-in-the-query#part")
            ctx.http.post("{provider.origin}/echo", data=b"12345")
            return r.status_code
    """)
    assert output == 200
    get, post = run["http_calls"]
    assert {k: get[k] for k in ("kind", "method", "host", "port", "path", "status_code", "status", "error")} == {
        "kind": "http", "method": "GET", "host": "127.0.0.1", "port": provider.port, "path": "/doc/manual",
        "status_code": 200, "status": "ok", "error": None}
    assert get["bytes"] > 0 and get["latency_ms"] > 0 and _within_run(run, get["started_at"])
    assert get["workflow"] == run["workflow"]
    assert (post["method"], post["path"], post["bytes"], post["status"]) == ("POST", "/echo", 5, "ok")
    assert get["started_at"] <= post["started_at"]
    assert "tok-in-the-query" not in str(run)


def test_an_answer_with_an_error_status_is_an_answered_call(client: Client, provider: StandInProvider) -> None:
    _, run = _run(client, f"""
        def execute(ctx):
            return ctx.http.get("{provider.origin}/nowhere").status_code
    """)
    [call] = run["http_calls"]
    assert (call["status_code"], call["status"], call["error"]) == (404, "ok", None)


def test_a_refused_connection_is_recorded_as_an_error(client: Client, closed_port: int) -> None:
    output, run = _run(client, f"""
        def execute(ctx):
            try:
                ctx.http.get("http://user:hunter2@127.0.0.1:{closed_port}/down?key=k-in-the-query")
            except Exception as exc:
                return type(exc).__name__
            return "answered"
    """)
    assert output != "answered"
    [call] = run["http_calls"]
    assert (call["host"], call["port"], call["path"], call["status_code"], call["status"], call["bytes"]) == \
        ("127.0.0.1", closed_port, "/down", None, "error", 0)
    assert "refused" in call["error"].lower()
    assert "k-in-the-query" not in str(run["http_calls"]) and "hunter2" not in str(run["http_calls"])
    assert _within_run(run, call["started_at"])


def test_a_call_the_egress_guard_refuses_is_recorded_as_an_error(client: Client, provider: StandInProvider) -> None:
    _, run = _run(client, f"""
        def execute(ctx):
            try:
                ctx.http.get("http://127.0.0.2:{provider.port}/doc/x")
            except Exception:
                return "refused"
    """)
    [call] = run["http_calls"]
    assert (call["host"], call["status"], call["status_code"]) == ("127.0.0.2", "error", None)
    assert "127.0.0.2" in call["error"]


def test_a_secret_in_the_url_path_is_redacted_in_the_record(client: Client, provider: StandInProvider) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    output, run = _run(client, f"""
        def execute(ctx):
            return ctx.http.get("{provider.origin}/doc/" + ctx.secrets["token"]).json()["name"] == ctx.secrets["token"]
    """, secrets={"token": secret})
    assert output is True
    [call] = run["http_calls"]
    assert call["path"] == "/doc/[redacted]"
    assert secret not in str(run)


def test_a_long_path_is_cut_its_params_dropped_and_a_refused_method_is_not_kept(
        client: Client, provider: StandInProvider) -> None:
    output, run = _run(client, f"""
        def execute(ctx):
            answered = ctx.http.get("{provider.origin}/doc/" + "p" * 5000 + ";jsessionid=tok-in-the-params").status_code
            try:
                ctx.http.request("BREW" + "X" * 5000, "{provider.origin}/doc/tea")
            except Exception as exc:
                return [answered, type(exc).__name__]
            return [answered, "sent"]
    """)
    assert output[1] != "sent"
    long, refused = run["http_calls"]
    assert long["path"] == "/doc/" + "p" * (MAX_TARGET_CHARS - len("/doc/") - 1) + "…"
    assert (long["method"], long["status"]) == ("GET", "ok")
    assert (refused["method"], refused["path"], refused["status"]) == ("?", "/doc/tea", "error")
    assert "tok-in-the-params" not in str(run["http_calls"]) and "X" * 20 not in str(run["http_calls"])


def test_nested_calls_are_recorded_with_their_start_and_the_workflow_that_made_them(
        client: Client, provider: StandInProvider) -> None:
    app, callee, caller = _names("app", "callee", "caller")
    client.request("PUT", f"/api/v1/applications/{app}",
                   json={"intents": {"answer": {"model": "echo", "base_url": provider.base_url}}})
    client.upload(callee, f"""
        def execute(ctx):
            return ctx.http.get("{provider.origin}/doc/inner").json()["name"]
    """)
    client.upload(caller, f"""
        APPLICATION = "{app}"

        def execute(ctx):
            ctx.http.get("{provider.origin}/doc/outer")
            inner = ctx.workflows.call("{callee}", input={{}})
            ctx.chat.completions.create(intent="answer")
            return inner
    """)
    response = client.invoke(caller, input={})
    assert response.status_code == 200, response.text
    assert response.json()["output"] == "inner"
    run = client.run(response.json()["request_id"])
    [nested] = run["workflow_calls"]
    assert nested["workflow"] == callee and _within_run(run, nested["started_at"])
    assert [(c["path"], c["workflow"]) for c in run["http_calls"]] == [("/doc/outer", caller), ("/doc/inner", callee)]
    assert nested["started_at"] <= run["http_calls"][1]["started_at"]
    [model_call] = run["model_calls"]
    assert model_call["workflow"] == caller


def test_a_record_keeps_a_bounded_number_of_http_calls_and_counts_the_rest(client: Client,
                                                                         provider: StandInProvider) -> None:
    extra = 3
    # Calls the egress guard refuses cost no connection: the cap is reached quickly.
    output, run = _run(client, f"""
        def execute(ctx):
            refused = 0
            for i in range({MAX_RECORDED_HTTP_CALLS + extra}):
                try:
                    ctx.http.get("http://127.0.0.2:{provider.port}/n/%d" % i)
                except Exception:
                    refused += 1
            return refused
    """)
    assert output == MAX_RECORDED_HTTP_CALLS + extra
    calls = run["http_calls"]
    assert len(calls) == MAX_RECORDED_HTTP_CALLS + 1
    assert [c["path"] for c in calls[:2]] == ["/n/0", "/n/1"]
    assert calls[MAX_RECORDED_HTTP_CALLS - 1]["path"] == f"/n/{MAX_RECORDED_HTTP_CALLS - 1}"
    assert {c["kind"] for c in calls[:-1]} == {"http"}
    assert calls[-1]["kind"] == "omitted" and calls[-1]["count"] == extra
