"""Datastores read from inside runs (``ctx.datastore``, served by the real worker) and driven by the real CLI:
the same answers as the API, an update seen by the next run, another account's store as a DatastoreError, a
query embedded by the worker, and ``flowpool datastore create|ingest|search|get|delete`` as a user runs them."""
from __future__ import annotations

import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from flowpool.blobs import RedisBlobs
from flowpool.datastores import Datastores
from flowpool.datastores.replica import FORMAT
from flowpool.settings import Settings
from registry.accounts import Accounts
from tests.helpers import Client, ok, run_flowpool
from tests.provider import StandInProvider

DIMS = 6

READS = """\
CACHE_TTL_SECONDS = 0


def ids(hits):
    return [hit["id"] for hit in hits]


def execute(ctx):
    store, args = ctx.input["store"], ctx.input
    return {
        "get": ctx.datastore.get(store, args["id"]),
        "missing": ctx.datastore.get(store, "no-such-id"),
        "number": ctx.datastore.get(store, 40),  # an integer id: its decimal string, as at ingest
        "keyword": ids(ctx.datastore.search(store, query=args["query"], limit=5)),
        "vector": ids(ctx.datastore.search(store, vector=args["vector"], limit=5)),
        "hybrid": ids(ctx.datastore.search(store, query=args["query"], vector=args["vector"], limit=5)),
        "red": ids(ctx.datastore.search(store, query=args["query"], limit=20, filters={"colour": "red"})),
    }
"""

TRIES = """\
from flowpool_workflow import DatastoreError, WorkflowError

CACHE_TTL_SECONDS = 0


def execute(ctx):
    failures = {}
    for name, call in (("get", lambda: ctx.datastore.get(ctx.input["store"], "r1")),
                       ("search", lambda: ctx.datastore.search(ctx.input["store"], query="apple")),
                       ("bad_vector", lambda: ctx.datastore.search(ctx.input["own"], vector=[1.0]))):
        try:
            call()
        except DatastoreError as exc:
            failures[name] = {"message": str(exc), "workflow_error": isinstance(exc, WorkflowError)}
    return failures
"""


def _records(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    words = ["apple", "river", "stone", "cloud", "ember", "frost", "maple", "orbit"]
    out = []
    for i in range(n):
        vector = rng.normal(size=DIMS)
        out.append({"id": f"r{i}", "body": " ".join(rng.choice(words, size=8)), "colour": ["red", "blue"][i % 3 == 0],
                    "vec": (vector / np.linalg.norm(vector)).tolist()})
    return out


def _make_store(client: Client, name: str, records: list[dict[str, Any]], **spec: Any) -> None:
    body = {"name": name, "id_field": "id", "text_fields": ["body"], "vector_field": "vec", "vector_dims": DIMS,
            "filters": ["colour"], **spec}
    created = client.post("/api/v1/datastores", json=body)
    assert created.status_code == 201, created.text
    if records:
        ingested = client.post(f"/api/v1/datastores/{name}/records", json=records)
        assert ingested.status_code == 200, ingested.text


def _output(client: Client, ref: str, **input: Any) -> Any:
    response = client.invoke(ref, input=input)
    assert response.status_code == 200, response.text
    return response.json()["output"]


def _api_ids(client: Client, name: str, **body: Any) -> list[str]:
    response = client.post(f"/api/v1/datastores/{name}/search", json=body)
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["data"]["data"]]


def test_a_run_reads_a_store_as_the_api_does(client: Client) -> None:
    name = f"runs-{uuid.uuid4().hex[:6]}"
    records = _records(40)
    _make_store(client, name, records)
    assert client.post(f"/api/v1/datastores/{name}/records", json=[{"id": 40, "body": "numbered"}]).status_code == 200
    client.upload("reads", READS)
    vector = records[5]["vec"]

    out = _output(client, "reads", store=name, id="r7", query="ember frost", vector=vector)

    assert {k: v for k, v in out["get"].items() if k != "vec"} == {k: v for k, v in records[7].items() if k != "vec"}
    assert np.allclose(out["get"]["vec"], records[7]["vec"], atol=1e-6)
    assert out["missing"] is None
    assert out["number"] == {"id": "40", "body": "numbered"}
    assert out["keyword"] == _api_ids(client, name, query="ember frost", limit=5)
    assert out["vector"] == _api_ids(client, name, vector=vector, limit=5) and out["vector"][0] == "r5"
    assert out["hybrid"] == _api_ids(client, name, query="ember frost", vector=vector, limit=5)
    assert out["red"] and all(records[int(i[1:])]["colour"] == "red" for i in out["red"])


def test_an_update_is_seen_by_the_next_run(client: Client) -> None:
    name = f"upd-{uuid.uuid4().hex[:6]}"
    records = _records(5)
    _make_store(client, name, records)
    client.upload("reads", READS)
    before = _output(client, "reads", store=name, id="r2", query="apple", vector=records[0]["vec"])

    changed = {**records[2], "body": "zeppelin"}
    assert client.post(f"/api/v1/datastores/{name}/records", json=[changed]).status_code == 200
    assert client.request("DELETE", f"/api/v1/datastores/{name}/records", json={"ids": ["r0"]}).status_code == 200
    after = _output(client, "reads", store=name, id="r2", query="zeppelin", vector=records[0]["vec"])

    assert before["get"]["body"] == records[2]["body"] and before["vector"][0] == "r0"
    assert after["get"]["body"] == "zeppelin" and after["keyword"] == ["r2"]
    assert "r0" not in after["vector"]


def test_another_accounts_store_is_a_datastore_error_in_the_run(client: Client, stack: Any) -> None:
    assert stack.api_url is not None
    owner = Client(stack.api_url, stack.create_account(f"owner-{uuid.uuid4().hex[:6]}"))
    theirs, own = f"theirs-{uuid.uuid4().hex[:6]}", f"own-{uuid.uuid4().hex[:6]}"
    _make_store(owner, theirs, _records(3))
    _make_store(client, own, _records(3))
    client.upload("tries", TRIES)

    out = _output(client, "tries", store=theirs, own=own)

    assert set(out) == {"get", "search", "bad_vector"}
    for name in ("get", "search"):
        assert theirs in out[name]["message"] and "not found" in out[name]["message"].lower()
        assert out[name]["workflow_error"] is True
    assert str(DIMS) in out["bad_vector"]["message"]


def test_a_query_is_embedded_by_the_worker_for_a_store_with_an_endpoint(
        client: Client, provider: StandInProvider) -> None:
    name = f"emb-{uuid.uuid4().hex[:6]}"
    _make_store(client, name, [{"id": "a", "body": "quiet mountain lake"}, {"id": "b", "body": "busy city street"}],
                vector_dims=32, filters=[],
                embedding={"base_url": provider.base_url, "model": "hash-32", "api_key_env": "STANDIN_API_KEY"})
    client.upload("asks", """\
        CACHE_TTL_SECONDS = 0

        def execute(ctx):
            return ctx.datastore.search(ctx.input["store"], query="city street", limit=2)
        """)

    hits = _output(client, "asks", store=name)

    assert hits[0]["id"] == "b" and hits[0]["scores"]["vector"] > 0
    asked = [r for r in provider.sent("hash-32") if r["body"]["input"] == ["city street"]]
    assert asked and asked[-1]["headers"].get("Authorization") == "Bearer sk-from-the-worker-environment"


def test_a_replica_still_catching_up_at_the_runs_soft_limit_ends_the_run_there(stack: Any, tmp_path: Path) -> None:
    db = redis.Redis.from_url(stack.redis_url)
    account, key, _ = Accounts(db).create(f"late-{uuid.uuid4().hex[:6]}")
    client, name = Client(stack.api_url, key), f"late-{uuid.uuid4().hex[:6]}"
    _make_store(client, name, _records(3))
    # Another host writes a batch: this host's replica (the API's, the worker's) is now one behind.
    other = Datastores(db, RedisBlobs(db), Settings(cache_dir=str(tmp_path)))
    other.ingest(account.id, name, [{"id": "late", "body": "late"}])
    generation = other.manifests.read(account.id, name).generation
    replica = Path(Settings(cache_dir=None).cache_path) / "datastores" / account.id / name / generation / FORMAT
    for ref, seconds in (("late", 1), ("unhurried", 30)):
        client.upload(ref, f"""\
            TIMEOUT_SECONDS = {seconds}
            CACHE_TTL_SECONDS = 0

            def execute(ctx):
                return ctx.datastore.get(ctx.input["store"], "late")
            """)
    replica.mkdir(parents=True, exist_ok=True)
    fd = os.open(replica / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a process of this host stuck applying (the wait alone is 120 s)
        held = client.post("/workflow/chat/completions", json={"model": "workflow:late", "input": {"store": name}},
                           timeout=30)
    finally:
        os.close(fd)
        db.close()

    assert held.status_code == 408, held.text  # the run's soft limit, not a worker slot held for 120 s
    assert "soft time limit" in held.text
    assert _output(client, "unhurried", store=name) == {"id": "late", "body": "late"}


def _cli_env(client: Client) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    env.update(FLOWPOOL_API_URL=client.base_url, FLOWPOOL_API_KEY=client.key)
    return env


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_the_cli_creates_ingests_in_batches_and_searches(client: Client, tmp_path: Path, suffix: str) -> None:
    env, name = _cli_env(client), f"cli-{uuid.uuid4().hex[:6]}"
    records = [{"id": f"c{i}", "body": f"note {i} about {'comets' if i == 3 else 'tides'}", "colour": "red"}
               for i in range(7)]
    path = tmp_path / f"records{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("id,body,colour\n" + "".join(f"{r['id']},\"{r['body']}\",red\n" for r in records))

    created = run_flowpool("datastore", "create", name, "--id-field", "id", "--text-field", "body",
                           "--filter", "colour", env=env)
    ingested = run_flowpool("datastore", "ingest", name, str(path), "--batch-records", "3", env=env)
    found = run_flowpool("datastore", "search", name, "--query", "comets", "--filter", "colour=red", env=env)
    shown = run_flowpool("datastore", "get", name, "c3", env=env)
    listed = run_flowpool("datastore", "list", env=env)
    deleted = run_flowpool("datastore", "delete", name, env=env)

    assert json.loads(ok(created))["name"] == name
    assert "7 records upserted" in ok(ingested) and "ingesting" in ingested.stderr
    assert [hit["id"] for hit in json.loads(ok(found))["data"]] == ["c3"]
    assert json.loads(ok(shown))["body"] == "note 3 about comets"
    assert name in ok(listed) and "7 records" in listed.stdout
    assert json.loads(ok(deleted))["deleted"] is True


def test_the_cli_names_the_lines_of_a_refused_batch(client: Client, tmp_path: Path) -> None:
    env, name = _cli_env(client), f"clibad-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "1", "body": "a"}\n{"id": "2", "body": "b"}\n{"id": "3", "body": "c"}\n{"id": "4", "bo\n')
    ok(run_flowpool("datastore", "create", name, "--id-field", "id", "--text-field", "body", env=env))

    result = run_flowpool("datastore", "ingest", name, str(path), "--batch-records", "2", env=env)

    assert result.returncode == 1
    assert "lines 3-4" in result.stderr and "line 4: malformed" in result.stderr
    assert "2 records before it" in result.stderr
    assert client.get(f"/api/v1/datastores/{name}").json()["data"]["records"] == 2


def test_the_cli_lists_nothing_with_a_hint_for_an_account_without_stores(stack: Any) -> None:
    assert stack.api_url is not None
    fresh = Client(stack.api_url, stack.create_account(f"empty-{uuid.uuid4().hex[:6]}"))

    listed = run_flowpool("datastore", "list", env=_cli_env(fresh))

    assert ok(listed) == ""
    assert "no datastores yet" in listed.stderr and "flowpool datastore create" in listed.stderr
