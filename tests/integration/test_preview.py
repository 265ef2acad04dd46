"""``POST /api/v1/workflows/preview`` through the real API and workers: a script run once without an upload,
answered as ``POST /workflow/chat/completions`` answers, stored hidden and expiring, the account's alone."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import textwrap
import uuid
from pathlib import Path

import pytest
import redis
import requests

import flowpool
from flowpool import keys
from flowpool.registry.previews import TTL_SECONDS, preview_ref
from flowpool.registry.versions import content_hash
from tests.helpers import Client, account_id, error_of, sse_events

COUNTS = '''\
"""Counts the words of its input, saying so on the way."""
INPUT_SCHEMA = {"text": {"type": "string", "required": True}}
CACHE_TTL_SECONDS = 3600


def execute(ctx):
    words = ctx.input["text"].split()
    ctx.log.info("counting", words=len(words))
    ctx.emit("progress", "counting")
    ctx.emit("progress", "counted")
    return {"words": len(words)}
'''

# Returns something new each run: two runs answered alike would be one answered from the cache.
FRESH = '''\
import uuid


def execute(ctx):
    return {"nonce": uuid.uuid4().hex}
'''

READS_ACCESSORY = '''\
import os


def execute(ctx):
    return {"has_key": bool(os.environ.get("TABLE_S3_KEY")), "secret": ctx.secrets.get("TOKEN")}
'''

PREVIEW = "/api/v1/workflows/preview"


def _preview(client: Client, script: str, headers: dict[str, str] | None = None, **body: object):  # type: ignore[no-untyped-def]
    body.setdefault("input", {"text": "one two three"})
    return client.post(PREVIEW, json={"script": textwrap.dedent(script), **body}, headers=headers or {})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _written_for(db: redis.Redis, account: str, script: str, accessories: dict[str, bytes]) -> list[bytes]:
    """Every key the preview of this content would write for the account: its workflow's and its blobs."""
    ref = preview_ref(content_hash(textwrap.dedent(script), accessories))
    return [*db.scan_iter(f"fp:a:{account}:wf:{ref}*"), *db.scan_iter(keys.blob(f"previews/{account}/{ref}/") + "*")]


def _ref_of(answer: dict[str, object]) -> str:
    model = str(answer["model"])
    assert model.startswith("workflow:fp-preview-"), model
    return model[len("workflow:"):]


def test_a_preview_answers_json_as_an_invocation_of_the_same_script_does(client: Client) -> None:
    ref = f"counts-{uuid.uuid4().hex[:6]}"
    client.upload(ref, COUNTS)
    invoked = client.invoke(ref, input={"text": "one two three"})

    previewed = _preview(client, COUNTS)

    assert previewed.status_code == 200, previewed.text
    answer = previewed.json()
    assert set(answer) == set(invoked.json())
    assert answer["object"] == "chat.completion" and answer["output"] == {"words": 3}
    assert answer["choices"][0]["message"]["content"] == json.dumps({"words": 3}, separators=(",", ":"))
    assert previewed.headers["X-Request-Id"] == answer["request_id"]
    run = client.run(answer["request_id"])
    assert run["workflow"] == _ref_of(answer) and run["status"] == "succeeded"
    assert [line["msg"] for line in run["logs"]] == ["counting"]


def test_a_streamed_preview_sends_each_chunk_then_the_completion_as_server_sent_events(client: Client) -> None:
    response = client.post(PREVIEW, json={"script": COUNTS, "input": {"text": "a b"}, "stream": True}, stream=True)

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [event["data"] for event in sse_events(response)]
    chunks = [e for e in events if isinstance(e, dict) and e.get("object") == "workflow.chunk"]
    assert [(c["type"], c["content"]) for c in chunks] == [("progress", "counting"), ("progress", "counted")]
    final = next(e for e in events if isinstance(e, dict) and e.get("choices"))
    assert final["output"] == {"words": 2} and final["model"].startswith("workflow:fp-preview-")
    assert events[-1] == "[DONE]"


def test_a_script_breaking_the_upload_rules_is_a_400_naming_its_line_and_nothing_is_stored(
        client: Client, stack_db: redis.Redis) -> None:
    account = account_id(stack_db, client)
    script = "import json\n\ndef execute(ctx):\n    return {'a': 1\n"

    response = _preview(client, script)

    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "script_validation_error"
    assert [problem["line"] for problem in error["errors"]] == [4]
    assert "line 4" in error["message"]
    assert list(stack_db.scan_iter(f"fp:a:{account}:wf:*")) == []


def test_a_preview_is_not_listed_among_the_workflows_and_its_ref_cannot_be_uploaded(client: Client) -> None:
    answer = _preview(client, COUNTS).json()
    ref = _ref_of(answer)

    listed = client.get("/api/v1/workflows")
    assert listed.status_code == 200
    assert ref not in [w["workflow_ref_name"] for w in listed.json()["data"]]
    assert listed.json()["pagination"]["total"] == 0
    refused = client.post("/api/v1/workflows/upload", json={"workflow_ref_name": ref, "script": COUNTS})
    assert refused.status_code == 400 and "reserved for previews" in error_of(refused)["message"]
    assert client.post("/api/v1/workflows/upload", json={"workflow_ref_name": "preview",
                                                         "script": COUNTS}).status_code == 400


def test_every_key_a_preview_and_its_run_write_expires_its_accessories_too(
        client: Client, stack_db: redis.Redis) -> None:
    account = account_id(stack_db, client)
    table = b'{"rows": []}'
    accessory = base64.b64encode(table).decode()

    answer = _preview(client, READS_ACCESSORY, accessories=[{"key": "table", "content_base64": accessory}]).json()

    assert answer["output"]["has_key"] is True
    ref, request_id = _ref_of(answer), answer["request_id"]
    blobs = [*stack_db.scan_iter(keys.blob(f"accessories/{account}/") + "*"),
             *stack_db.scan_iter(keys.blob(f"previews/{account}/") + "*")]
    assert [key.decode() for key in blobs] == [keys.blob(f"previews/{account}/{ref}/{_sha256(table)}")]
    written = [*stack_db.scan_iter(f"fp:a:{account}:wf:{ref}*"), *stack_db.scan_iter(f"fp:run:{request_id}*"),
               *blobs]
    assert {key.decode() for key in written} >= {
        keys.workflow(account, ref), keys.version(account, ref, "1.0.0"), keys.versions(account, ref),
        keys.version_hashes(account, ref), keys.workflow_runs(account, ref), keys.run(request_id)}
    written.append(keys.session_runs(account, answer["session_id"]).encode())
    lives = {key.decode(): stack_db.ttl(key) for key in written}
    assert all(seconds > 0 for seconds in lives.values()), lives  # -1: no TTL, -2: gone
    preview_keys = [key for key in lives if key.startswith((f"fp:a:{account}:wf:", keys.blob("")))]
    assert all(lives[key] <= TTL_SECONDS for key in preview_keys), lives  # the preview's own hour
    assert stack_db.zscore(keys.workflows(account), ref) is None


def test_a_preview_sent_again_renews_its_accessories_and_stores_one_that_lapsed(
        client: Client, stack_db: redis.Redis) -> None:
    account = account_id(stack_db, client)
    table = b'{"rows": [7]}'
    accessories = [{"key": "table", "content_base64": base64.b64encode(table).decode()}]
    ref = _ref_of(_preview(client, READS_ACCESSORY, accessories=accessories).json())
    blob = keys.blob(f"previews/{account}/{ref}/{_sha256(table)}")
    stack_db.expire(blob, 30)

    assert _preview(client, READS_ACCESSORY, accessories=accessories).json()["output"]["has_key"] is True
    assert stack_db.ttl(blob) > 30  # the preview's lifetime again
    stack_db.delete(blob)  # lapsed
    assert _preview(client, READS_ACCESSORY, accessories=accessories).json()["output"]["has_key"] is True
    assert stack_db.ttl(blob) > 30 and stack_db.lrange(blob, 0, -1) == [table]


def test_a_preview_is_never_answered_from_the_cache(client: Client) -> None:
    first = _preview(client, FRESH, cache=True)
    second = _preview(client, FRESH, cache=True)

    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.headers["X-Cache"] == second.headers["X-Cache"] == "MISS"
    assert first.json()["model"] == second.json()["model"]  # the same stored preview, run twice
    assert first.json()["output"] != second.json()["output"]


def test_an_idempotency_key_sent_again_replays_the_first_preview_run(client: Client) -> None:
    headers = {"Idempotency-Key": f"preview-{uuid.uuid4().hex}"}
    first = _preview(client, FRESH, headers=headers)
    again = _preview(client, FRESH, headers=headers)

    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["request_id"] == first.json()["request_id"]
    assert again.json()["output"] == first.json()["output"]


def test_another_account_can_neither_see_nor_run_a_preview(client: Client, stack: object) -> None:
    other = Client(client.base_url, stack.create_account(f"other-{uuid.uuid4().hex[:8]}"))  # type: ignore[attr-defined]
    answer = _preview(client, COUNTS).json()
    ref, request_id = _ref_of(answer), answer["request_id"]

    assert other.get(f"/api/v1/runs/{request_id}").status_code == 404
    assert other.get(f"/api/v1/workflows/{ref}").status_code == 404
    assert other.get(f"/api/v1/workflows/{ref}/runs").status_code == 404
    assert other.invoke(ref, input={"text": "x"}).status_code == 404
    assert client.get(f"/api/v1/runs/{request_id}").status_code == 200


def test_a_preview_is_no_workflow_even_to_its_own_account_and_takes_no_id(client: Client) -> None:
    ref = _ref_of(_preview(client, COUNTS).json())

    for method, path in (("GET", f"/api/v1/workflows/{ref}"), ("GET", f"/api/v1/workflows/{ref}/versions"),
                         ("DELETE", f"/api/v1/workflows/{ref}")):
        assert client.request(method, path).status_code == 404, (method, path)
    assert client.post(f"/api/v1/workflows/{ref}/activate", json={"version": "0.0.0"}).status_code == 404
    # Looking at it gave it no id from the account's counter: the account's first workflow is number 1.
    assert client.upload(f"first-{uuid.uuid4().hex[:8]}", COUNTS)["id"] == 1


def test_a_preview_without_a_key_is_a_401(client: Client) -> None:
    response = requests.post(client.base_url + PREVIEW, json={"script": COUNTS, "input": {"text": "x"}}, timeout=30)

    assert response.status_code == 401


def test_a_preview_body_naming_a_model_is_refused(client: Client) -> None:
    response = _preview(client, COUNTS, model="workflow:anything")

    assert response.status_code == 400 and error_of(response)["param"] == "model"


def test_the_account_quotas_apply_to_previews(client: Client, stack_db: redis.Redis) -> None:
    account = account_id(stack_db, client)
    stack_db.hset(keys.account_limits(account), mapping={"rpm": 1})

    assert _preview(client, COUNTS).status_code == 200
    refused = _preview(client, COUNTS)

    assert refused.status_code == 429
    assert error_of(refused)["type"] == "rate_limit_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1


def test_a_preview_refused_by_a_quota_stores_neither_its_workflow_nor_its_accessories(
        client: Client, stack_db: redis.Redis) -> None:
    account = account_id(stack_db, client)
    stack_db.hset(keys.account_limits(account), mapping={"rpm": 1})
    assert _preview(client, COUNTS).status_code == 200
    table = b'{"rows": [1, 2, 3]}'

    refused = _preview(client, READS_ACCESSORY, accessories=[
        {"key": "table", "content_base64": base64.b64encode(table).decode()}])

    assert refused.status_code == 429, refused.text
    assert _written_for(stack_db, account, READS_ACCESSORY, {"table": table}) == []
    assert [*stack_db.scan_iter(keys.blob(f"accessories/{account}/") + "*"),
            *stack_db.scan_iter(keys.blob(f"previews/{account}/") + "*")] == []


def test_a_preview_whose_idempotency_key_names_another_request_stores_nothing(
        client: Client, stack_db: redis.Redis) -> None:
    account = account_id(stack_db, client)
    headers = {"Idempotency-Key": f"preview-{uuid.uuid4().hex}"}
    assert _preview(client, COUNTS, headers=headers).status_code == 200
    table = b'{"rows": []}'

    conflict = _preview(client, READS_ACCESSORY, headers=headers, accessories=[
        {"key": "table", "content_base64": base64.b64encode(table).decode()}])

    assert conflict.status_code == 422, conflict.text
    assert _written_for(stack_db, account, READS_ACCESSORY, {"table": table}) == []


def test_secrets_and_accessories_reach_the_previewed_script(client: Client) -> None:
    accessory = base64.b64encode(b"[1, 2]").decode()

    answer = _preview(client, READS_ACCESSORY, secrets={"TOKEN": "t0k"},
                      accessories=[{"key": "table", "content_base64": accessory}]).json()

    assert answer["output"] == {"has_key": True, "secret": "t0k"}


def _sdk(client: Client) -> flowpool.Flowpool:
    return flowpool.Flowpool(api_key=client.key, base_url=client.base_url, timeout=60, max_retries=0)


def test_the_sdk_previews_a_script_with_its_accessories_and_secrets(client: Client, tmp_path: Path) -> None:
    (tmp_path / "table.json").write_text("[1, 2]")
    with _sdk(client) as fp:
        from_bytes = fp.workflows.preview(READS_ACCESSORY, input={}, secrets={"TOKEN": "t0k"},
                                          accessories={"table": b"[1, 2]"})
        from_a_file = fp.workflows.preview(READS_ACCESSORY, input={}, accessories={"table": tmp_path / "table.json"})

    assert from_bytes.object == "chat.completion" and from_bytes.model.startswith("workflow:fp-preview-")
    assert from_bytes.to_dict()["output"] == {"has_key": True, "secret": "t0k"}
    assert from_a_file.to_dict()["output"] == {"has_key": True, "secret": None}


def test_the_sdk_streams_a_preview_and_replays_it_by_its_idempotency_key(client: Client) -> None:
    key = f"preview-{uuid.uuid4().hex}"
    with _sdk(client) as fp:
        events = [event.to_dict() for event in fp.workflows.preview(COUNTS, input={"text": "a b"}, stream=True,
                                                                    idempotency_key=key)]
        again = fp.workflows.preview(COUNTS, input={"text": "a b"}, idempotency_key=key)

    chunks = [(e["type"], e["content"]) for e in events if e.get("object") == "workflow.chunk"]
    assert chunks == [("progress", "counting"), ("progress", "counted")]
    assert events[-1]["object"] == "chat.completion" and events[-1]["output"] == {"words": 2}
    assert again.request_id == events[-1]["request_id"] and again.output.words == 2


def test_the_sdk_raises_a_bad_request_naming_the_line_of_a_script_breaking_the_rules(client: Client) -> None:
    with _sdk(client) as fp, pytest.raises(flowpool.BadRequestError) as raised:
        fp.workflows.preview("import json\n\ndef execute(ctx):\n    return {'a': 1\n", input={})

    assert raised.value.status_code == 400 and raised.value.type == "script_validation_error"
    assert [problem["line"] for problem in raised.value.body["error"]["errors"]] == [4]


def test_the_async_sdk_previews_and_streams_a_script(client: Client) -> None:
    async def main() -> tuple[object, list[dict[str, object]]]:
        async with flowpool.AsyncFlowpool(api_key=client.key, base_url=client.base_url, timeout=60,
                                          max_retries=0) as fp:
            answer = await fp.workflows.preview(COUNTS, input={"text": "one two three"})
            events = [event.to_dict() async for event in await fp.workflows.preview(
                COUNTS, input={"text": "a b"}, stream=True)]
            return answer, events

    answer, events = asyncio.run(main())

    assert answer.output.words == 3  # type: ignore[attr-defined]
    assert [e["content"] for e in events if e.get("object") == "workflow.chunk"] == ["counting", "counted"]
    assert events[-1]["output"] == {"words": 2}
