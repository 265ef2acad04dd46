"""The example workflows, each run through the whole stack against the stand-in vendor."""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

import requests

from tests.helpers import Client
from tests.provider import StandInProvider

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def _setup(client: Client, provider: StandInProvider, support_primary: str = "fail") -> None:
    client.request("PUT", "/api/v1/applications/support", json={"intents": {"answer": {
        "model": support_primary, "base_url": provider.base_url,
        "fallbacks": [{"model": "echo", "base_url": provider.base_url}]}}}).raise_for_status()
    client.request("PUT", "/api/v1/applications/docs", json={"intents": {"summarize": {
        "model": "echo", "base_url": provider.base_url}}}).raise_for_status()
    for name in ("support_answer", "document_pipeline", "router"):
        client.upload(name.replace("_", "-"), (EXAMPLES / f"{name}.py").read_text())


def test_support_answer_falls_back_when_the_primary_fails(client: Client, provider: StandInProvider) -> None:
    _setup(client, provider)
    body = _ok(client.invoke("support-answer", input={"question": "Where is my parcel?", "customer": "Ada"}))
    assert body["output"] == {"answer": "echo: Customer Ada asks: Where is my parcel?", "escalate": False}
    calls = client.run(body["request_id"])["model_calls"]
    assert [(c["model"], c["status"], c["fallback"]) for c in calls] == [("fail", "error", 0), ("echo", "ok", 1)]
    refund = _ok(client.invoke("support-answer", input={"question": "I want a refund"}))
    assert refund["output"]["escalate"] is True


def test_support_answer_escalates_when_no_model_answers(client: Client, provider: StandInProvider) -> None:
    _setup(client, provider)
    client.request("PUT", "/api/v1/applications/support", json={"intents": {"answer": {
        "model": "fail", "base_url": provider.base_url}}}).raise_for_status()
    body = _ok(client.invoke("support-answer", input={"question": "Hello?"}, cache=False))
    assert body["output"]["escalate"] is True and "a person will get back to you" in body["output"]["answer"]


def test_document_pipeline_fetches_summarizes_each_section_and_reports_progress(
        client: Client, provider: StandInProvider) -> None:
    _setup(client, provider)
    url = f"{provider.origin}/article?paragraphs=3"
    body = _ok(client.invoke("document-pipeline", input={"url": url}))
    assert body["output"]["url"] == url
    assert body["output"]["sections"] == [f"echo: Paragraph {i} says something worth knowing." for i in (1, 2, 3)]
    run = client.run(body["request_id"])
    assert [c["content"] for c in run["chunks"]] == [{"section": i, "of": 3} for i in (1, 2, 3)]
    assert len(run["model_calls"]) == 3 and body["usage"]["total_tokens"] > 0


def test_router_sends_urls_to_the_pipeline_and_questions_to_support(client: Client,
                                                                   provider: StandInProvider) -> None:
    _setup(client, provider, support_primary="echo")
    doc = _ok(client.invoke("router", input={"text": f"{provider.origin}/article?paragraphs=2"}))
    assert doc["output"]["route"] == "document-pipeline"
    assert len(doc["output"]["result"]["sections"]) == 2
    question = _ok(client.invoke("router", input={"text": "How do I reset my password?"}))
    assert question["output"] == {"route": "support-answer", "result": {
        "answer": "echo: Customer there asks: How do I reset my password?", "escalate": False}}
    run = client.run(question["request_id"])
    assert [c["workflow"] for c in run["workflow_calls"]] == ["support-answer"]
    assert run["chunks"][0] == {"type": "route", "content": "support-answer"}


def test_sign_uses_the_request_secret_and_keeps_it_out_of_the_run(client: Client) -> None:
    client.upload("sign", (EXAMPLES / "sign.py").read_text())
    body = _ok(client.invoke("sign", input={"text": "pay 10 EUR"}, secrets={"signing_key": "k-example-7731"}))
    expected = hmac.new(b"k-example-7731", b"pay 10 EUR", hashlib.sha256).hexdigest()
    assert body["output"] == {"text": "pay 10 EUR", "signature": expected}
    assert "k-example-7731" not in str(client.run(body["request_id"]))
    missing = client.invoke("sign", input={"text": "pay 10 EUR"})
    assert missing.status_code == 500 and "signing_key" in missing.json()["error"]["message"]
