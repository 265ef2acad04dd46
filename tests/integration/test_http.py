"""ctx.http: outbound HTTP performed by the worker, against a server on loopback."""
from __future__ import annotations

import uuid
from typing import Any

import requests

from tests.helpers import Client
from tests.provider import StandInProvider


def _run(client: Client, script: str, **body: Any) -> dict[str, Any]:
    ref = f"http-{uuid.uuid4().hex[:6]}"
    client.upload(ref, script)
    response = client.invoke(ref, **({"input": {}} | body))
    assert response.status_code == 200, response.text
    return response.json()["output"]


def test_get_returns_status_headers_text_and_json(client: Client, provider: StandInProvider) -> None:
    output = _run(client, f"""
        def execute(ctx):
            r = ctx.http.get("{provider.origin}/doc/manual")
            return {{"status": r.status_code, "json": r.json(), "type": r.headers["Content-Type"], "ok": r.ok,
                    "text_starts": r.text[:1]}}
    """)
    assert output == {"status": 200, "json": {"name": "manual", "sections": ["intro", "usage", "faq"]},
                      "type": "application/json", "ok": True, "text_starts": "{"}


def test_post_sends_json_and_bytes(client: Client, provider: StandInProvider) -> None:
    output = _run(client, f"""
        def execute(ctx):
            a = ctx.http.post("{provider.origin}/echo", json={{"x": [1, 2]}})
            b = ctx.http.post("{provider.origin}/echo", data=bytes(range(5)))
            return {{"json": a.json(), "bytes": list(b.content)}}
    """)
    assert output == {"json": {"x": [1, 2]}, "bytes": [0, 1, 2, 3, 4]}


def test_a_loopback_address_the_operator_did_not_allow_is_refused(client: Client,
                                                                  provider: StandInProvider) -> None:
    before = len(provider.requests)
    output = _run(client, f"""
        from flowpool_workflow import EgressDenied

        def execute(ctx):
            try:
                ctx.http.get("http://127.0.0.2:{provider.port}/doc/x")
            except EgressDenied as exc:
                return str(exc)
            return "reached"
    """)
    assert "127.0.0.2" in output and "loopback" in output
    assert len(provider.requests) == before


def test_a_redirect_to_a_refused_address_is_refused(client: Client, provider: StandInProvider) -> None:
    output = _run(client, f"""
        from flowpool_workflow import EgressDenied

        def execute(ctx):
            try:
                ctx.http.get("{provider.origin}/redirect?to=http://127.0.0.2:{provider.port}/doc/x")
            except EgressDenied as exc:
                return str(exc)
            return "followed"
    """)
    assert "127.0.0.2" in output


def test_an_allowed_redirect_is_followed(client: Client, provider: StandInProvider) -> None:
    output = _run(client, f"""
        def execute(ctx):
            r = ctx.http.get("{provider.origin}/redirect?to={provider.origin}/doc/next")
            return {{"name": r.json()["name"], "hops": len(r.history)}}
    """)
    assert output == {"name": "next", "hops": 1}


def test_a_response_over_the_size_cap_is_an_error(client: Client, provider: StandInProvider) -> None:
    output = _run(client, f"""
        from flowpool_workflow import HttpError

        def execute(ctx):
            small = len(ctx.http.get("{provider.origin}/big?kb=8").content)
            try:
                ctx.http.get("{provider.origin}/big?kb=512")
            except HttpError as exc:
                return {{"small": small, "error": str(exc)}}
    """)
    assert output["small"] == 8192 and "over 65536 bytes" in output["error"]


def test_a_slow_answer_times_out_at_the_requested_timeout(client: Client, provider: StandInProvider) -> None:
    output = _run(client, f"""
        from flowpool_workflow import HttpError

        def execute(ctx):
            try:
                ctx.http.get("{provider.origin}/slow?ms=3000", timeout=0.3)
            except HttpError as exc:
                return "timeout" if "Timeout" in str(exc) else str(exc)
            return "answered"
    """)
    assert output == "timeout"


def test_non_http_schemes_are_refused(client: Client) -> None:
    output = _run(client, """
        from flowpool_workflow import EgressDenied

        def execute(ctx):
            try:
                ctx.http.get("file:///etc/passwd")
            except EgressDenied as exc:
                return str(exc)
    """)
    assert "only http and https" in output


def test_the_sandbox_itself_still_has_no_network(client: Client, provider: StandInProvider) -> None:
    output = _run(client, f"""
        import socket

        def execute(ctx):
            try:
                socket.create_connection(("127.0.0.1", {provider.port}), timeout=1)
            except OSError as exc:
                return type(exc).__name__
            return "connected"
    """)
    assert output != "connected"
    assert requests.get(provider.origin + "/doc/x", timeout=5).status_code == 200  # the server is up
