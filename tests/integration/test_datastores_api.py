"""Datastores over the HTTP API of the session's stack: lifecycle, ingest in each format, bad data that stores
nothing, get by id, keyword/vector/hybrid/filtered search, account isolation, the ingest body limit, and a store
whose embedding endpoint (the stand-in, on loopback) embeds records and queries."""
from __future__ import annotations

import json
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.helpers import Client, error_of
from tests.provider import StandInProvider

DIMS = 8
WORDS = ["apple", "banana", "cherry", "delta", "echo", "falcon", "grape", "harbor", "island", "jungle"]


def _name(prefix: str = "ds") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _records(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` generated records: text from a small vocabulary, a unit vector, a colour to filter on."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        words = rng.choice(WORDS, size=12)
        vector = rng.normal(size=DIMS)
        records.append({"id": f"r{i}", "title": f"doc {i}", "body": " ".join(words),
                        "colour": ["red", "blue"][i % 2], "vec": (vector / np.linalg.norm(vector)).tolist()})
    return records


def _create(client: Client, name: str, **spec: Any) -> dict[str, Any]:
    body = {"name": name, "id_field": "id", "text_fields": ["title", "body"], "vector_field": "vec",
            "vector_dims": DIMS, "filters": ["colour"], **spec}
    response = client.post("/api/v1/datastores", json=body)
    assert response.status_code == 201, response.text
    return response.json()["data"]


def _ingest(client: Client, name: str, body: bytes | str, content_type: str) -> Any:
    return client.post(f"/api/v1/datastores/{name}/records", data=body, headers={"Content-Type": content_type})


def _search(client: Client, name: str, **body: Any) -> dict[str, Any]:
    response = client.post(f"/api/v1/datastores/{name}/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()["data"]


@pytest.fixture(scope="module")
def filled(stack: Any) -> tuple[Client, str, list[dict[str, Any]]]:
    """One account's store of 60 generated records, ingested as a JSON array."""
    assert stack.api_url is not None
    client = Client(stack.api_url, stack.create_account(f"ds-{uuid.uuid4().hex[:8]}"))
    name = _name()
    _create(client, name)
    records = _records(60)
    response = _ingest(client, name, json.dumps(records), "application/json")
    assert response.status_code == 200, response.text
    assert response.json()["data"]["upserted"] == 60
    return client, name, records


def test_a_datastore_is_created_listed_shown_and_deleted(client: Client) -> None:
    name = _name()
    created = _create(client, name)
    assert (created["name"], created["id_field"], created["vector_dims"], created["records"]) == (name, "id", DIMS, 0)

    again = client.post("/api/v1/datastores", json={"name": name, "id_field": "id", "text_fields": ["body"]})
    listed = client.get("/api/v1/datastores").json()
    shown = client.get(f"/api/v1/datastores/{name}").json()["data"]
    deleted = client.request("DELETE", f"/api/v1/datastores/{name}")
    gone = client.get(f"/api/v1/datastores/{name}")

    assert again.status_code == 409 and error_of(again)["type"] == "conflict"
    assert [store["name"] for store in listed["data"]] == [name] and listed["pagination"]["total"] == 1
    assert shown["filters"] == ["colour"] and shown["text_fields"] == ["title", "body"]
    assert deleted.status_code == 200 and deleted.json()["data"] == {"name": name, "deleted": True}
    assert gone.status_code == 404 and error_of(gone)["type"] == "not_found"


def test_a_bad_spec_is_a_400_naming_the_field(client: Client) -> None:
    response = client.post("/api/v1/datastores", json={"name": _name(), "id_field": "id", "text_fields": ["body"],
                                                       "vector_field": "vec", "vector_dims": 0})

    assert response.status_code == 400 and "vector_dims" in error_of(response)["message"]


@pytest.mark.parametrize("content_type, body", [
    ("application/json", json.dumps([{"id": "a", "title": "one", "body": "first text", "colour": "red"},
                                     {"id": "b", "title": "two", "body": "second text", "colour": "blue"}])),
    ("application/x-ndjson", '{"id": "a", "title": "one", "body": "first text", "colour": "red"}\n\n'
                             '{"id": "b", "title": "two", "body": "second text", "colour": "blue"}\n'),
    ("text/csv", 'id,title,body,colour\na,one,"first text",red\nb,two,"second text",blue\n'),
], ids=["json", "jsonl", "csv"])
def test_each_format_is_ingested_and_read_back_by_id(client: Client, content_type: str, body: str) -> None:
    name = _name()
    _create(client, name, vector_field=None, vector_dims=None)

    response = _ingest(client, name, body, content_type)
    record = client.get(f"/api/v1/datastores/{name}/records/b")
    missing = client.get(f"/api/v1/datastores/{name}/records/zz")

    assert response.status_code == 200, response.text
    assert response.json()["data"]["upserted"] == 2
    assert record.json()["data"] == {"id": "b", "title": "two", "body": "second text", "colour": "blue"}
    assert client.get(f"/api/v1/datastores/{name}").json()["data"]["records"] == 2
    assert missing.status_code == 404 and "zz" in error_of(missing)["message"]


def test_an_ingest_upserts_by_id_and_delete_removes_records(client: Client) -> None:
    name = _name()
    _create(client, name, vector_field=None, vector_dims=None)
    _ingest(client, name, json.dumps([{"id": "a", "body": "old"}, {"id": "b", "body": "kept"}, {"id": 7}]),
            "application/json")

    _ingest(client, name, json.dumps([{"id": "a", "body": "new"}]), "application/json")
    deleted = client.request("DELETE", f"/api/v1/datastores/{name}/records", json={"ids": ["b", "nope", 7]})

    assert client.get(f"/api/v1/datastores/{name}/records/a").json()["data"]["body"] == "new"
    assert deleted.status_code == 200 and deleted.json()["data"]["deleted"] == 2, deleted.text
    assert client.get(f"/api/v1/datastores/{name}/records/b").status_code == 404
    assert client.get(f"/api/v1/datastores/{name}/records/7").status_code == 404
    assert client.get(f"/api/v1/datastores/{name}").json()["data"]["records"] == 1


@pytest.mark.parametrize("content_type, body, named", [
    ("application/x-ndjson", '{"id": "n1", "body": "fine"}\n{"id": "n2", "body": "fine"}\n{"id": "n3", "bo\n',
     "line 3"),
    ("text/csv", 'id,body,colour\nn1,fine,red\nn2,"unclosed,red\n', "line 3"),
    ("text/csv", 'id,body,colour\nn1,fine,red\nn2,too,many,values\n', "line 3"),
    ("application/json", '[{"id": "n1", "body": "fine", "vec": [1, 0, 0, 0, 0, 0, 0, 0]},'
                         ' {"id": "n2", "body": "short", "vec": [1, 0]}]', "n2"),
    ("application/json", '[{"id": "n1", "body": "fine"}, {"body": "no id"}]', "record 2"),
], ids=["jsonl-line", "csv-quote", "csv-columns", "vector-dims", "missing-id"])
def test_bad_data_is_a_400_naming_it_and_stores_nothing(client: Client, content_type: str, body: str,
                                                         named: str) -> None:
    name = _name()
    _create(client, name)

    response = _ingest(client, name, body, content_type)

    assert response.status_code == 400, response.text
    assert named in error_of(response)["message"]
    assert client.get(f"/api/v1/datastores/{name}/records/n1").status_code == 404
    assert client.get(f"/api/v1/datastores/{name}").json()["data"]["records"] == 0


def _bm25_top(records: list[dict[str, Any]], term: str) -> str:
    """The id a brute-force BM25 ranks first for one term (k1=1.2, b=0.75; title and body as one text)."""
    docs = [f"{r['title']} {r['body']}".lower().split() for r in records]
    average = sum(map(len, docs)) / len(docs)
    having = sum(term in d for d in docs)
    idf = np.log(1 + (len(docs) - having + 0.5) / (having + 0.5))

    def score(d: list[str]) -> float:
        tf = d.count(term)
        return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(d) / average))

    return records[max(range(len(docs)), key=lambda i: score(docs[i]))]["id"]


def test_a_keyword_search_ranks_by_bm25(filled: tuple[Client, str, list[dict[str, Any]]]) -> None:
    client, name, records = filled

    found = _search(client, name, query="falcon", limit=5)

    assert found["mode"] == "keyword"
    assert found["data"][0]["id"] == _bm25_top(records, "falcon")
    assert all("falcon" in hit["record"]["body"] for hit in found["data"])
    scores = [hit["score"] for hit in found["data"]]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0


def test_a_vector_search_matches_exact_cosine_top_k(filled: tuple[Client, str, list[dict[str, Any]]]) -> None:
    client, name, records = filled
    query = np.random.default_rng(1).normal(size=DIMS)
    matrix = np.array([r["vec"] for r in records])
    exact = [records[i]["id"] for i in np.argsort(-(matrix @ (query / np.linalg.norm(query))))[:10]]

    found = _search(client, name, vector=query.tolist(), limit=10)

    assert found["mode"] == "vector"
    assert [hit["id"] for hit in found["data"]] == exact


def test_both_at_once_is_a_hybrid_and_filters_keep_equal_fields(
        filled: tuple[Client, str, list[dict[str, Any]]]) -> None:
    client, name, records = filled
    target = records[17]

    hybrid = _search(client, name, query=target["body"], vector=target["vec"], limit=5)
    red = _search(client, name, query="apple", vector=target["vec"], limit=50, filters={"colour": "red"})
    unknown = client.post(f"/api/v1/datastores/{name}/search", json={"query": "apple", "filters": {"size": "L"}})

    assert hybrid["mode"] == "hybrid" and hybrid["data"][0]["id"] == target["id"]
    assert set(hybrid["data"][0]["scores"]) == {"keyword", "vector"}
    assert red["data"] and {hit["record"]["colour"] for hit in red["data"]} == {"red"}
    assert unknown.status_code == 400 and "size" in error_of(unknown)["message"]


def test_a_search_vector_of_the_wrong_size_is_a_400(filled: tuple[Client, str, list[dict[str, Any]]]) -> None:
    client, name, _ = filled

    response = client.post(f"/api/v1/datastores/{name}/search", json={"vector": [1.0, 2.0]})

    assert response.status_code == 400 and str(DIMS) in error_of(response)["message"]


def test_another_accounts_store_is_a_404_on_every_route(
        filled: tuple[Client, str, list[dict[str, Any]]], client: Client) -> None:
    _, name, _ = filled
    base = f"/api/v1/datastores/{name}"

    answers = [client.get(base), client.get(f"{base}/records/r1"),
               client.post(f"{base}/search", json={"query": "apple"}),
               _ingest(client, name, json.dumps([{"id": "x", "body": "intruder"}]), "application/json"),
               client.request("DELETE", f"{base}/records", json={"ids": ["r1"]}),
               client.request("DELETE", base)]

    assert [a.status_code for a in answers] == [404] * 6
    assert client.get("/api/v1/datastores").json()["data"] == []
    owner, _, _ = filled
    assert owner.get(f"{base}/records/r1").status_code == 200
    assert owner.get(base).json()["data"]["records"] == 60


def test_an_ingest_may_pass_the_body_limit_of_other_routes_up_to_its_own(client: Client) -> None:
    name = _name()
    _create(client, name, vector_field=None, vector_dims=None)
    text = "lorem " * 2000
    big = "".join(json.dumps({"id": f"b{i}", "body": text}) + "\n" for i in range(150))  # ~1.8 MB > 1 MB
    too_big = big * 3  # ~5.4 MB > FLOWPOOL_MAX_INGEST_MB=4

    accepted = _ingest(client, name, big, "application/x-ndjson")
    refused = _ingest(client, name, too_big, "application/x-ndjson")
    other_route = client.post(f"/api/v1/datastores/{name}/search", data=big, headers={"Content-Type": "application/json"})

    assert accepted.status_code == 200, accepted.text[:300]
    assert refused.status_code == 413 and error_of(refused)["type"] == "payload_too_large"
    assert other_route.status_code == 413
    assert client.get(f"/api/v1/datastores/{name}").json()["data"]["records"] == 150


def _raw_post(client: Client, path: str, length: int, body: bytes) -> tuple[int, dict[str, str]]:
    """POST saying ``Content-Length: length`` but sending only ``body``, on a connection of its own: the answer's
    status and headers."""
    parts = urlsplit(client.base_url)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {client.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received:
            piece = sock.recv(65536)
            assert piece, f"the connection closed before the answer's head: {received!r}"
            received += piece
    lines = received.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}


@pytest.mark.parametrize(("route", "length"), [("records", 5 << 20), ("search", 2 << 20)])
def test_a_body_refused_unread_is_answered_with_connection_close(client: Client, route: str, length: int) -> None:
    # The server closes the connection after a 413 instead of reading the body it refused. An answer that said
    # keep-alive would have a client put the connection back in its pool, and its next request there be reset.
    name = _name()
    _create(client, name, vector_field=None, vector_dims=None)
    path = f"/api/v1/datastores/{name}/{route}"

    refused = _raw_post(client, path, length, b"x" * (64 << 10))
    small = json.dumps({"query": "apple"} if route == "search" else [{"id": "a", "body": "apple"}]).encode()
    served = _raw_post(client, path, len(small), small)

    assert refused[0] == 413 and refused[1]["connection"] == "close"
    assert served[0] == 200 and served[1]["connection"] == "keep-alive"  # only a refused body closes


def test_the_openapi_document_lists_the_datastore_routes(client: Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]

    assert set(paths["/api/v1/datastores"]) == {"get", "post"}
    assert set(paths["/api/v1/datastores/{name}"]) == {"get", "delete"}
    assert set(paths["/api/v1/datastores/{name}/records"]) == {"post", "delete"}
    assert "get" in paths["/api/v1/datastores/{name}/records/{record_id}"]
    assert paths["/api/v1/datastores/{name}/search"]["post"]["requestBody"]


def test_a_store_with_an_embedding_endpoint_embeds_records_and_queries(
        client: Client, provider: StandInProvider) -> None:
    name = _name()
    _create(client, name, text_fields=["body"], vector_dims=16, filters=[],
            embedding={"base_url": provider.base_url, "model": "hash-16", "api_key_env": "STANDIN_API_KEY"})
    bodies = {"e1": "red apple pie", "e2": "blue harbor boats", "e3": "green jungle river"}
    response = _ingest(client, name, json.dumps([{"id": k, "body": v} for k, v in bodies.items()]),
                       "application/json")

    found = _search(client, name, query="harbor boats", limit=3)
    sent = provider.sent("hash-16")

    assert response.status_code == 200, response.text
    assert found["mode"] == "hybrid" and found["data"][0]["id"] == "e2"
    assert found["data"][0]["scores"]["vector"] > 0
    assert sorted(sum((r["body"]["input"] for r in sent), [])) == sorted([*bodies.values(), "harbor boats"])
    assert {r["headers"].get("Authorization") for r in sent} == {"Bearer sk-from-the-worker-environment"}


def test_an_embedding_key_the_operator_does_not_list_is_refused_at_create(
        client: Client, provider: StandInProvider) -> None:
    response = client.post("/api/v1/datastores", json={
        "name": _name(), "id_field": "id", "text_fields": ["body"], "vector_field": "vec", "vector_dims": 4,
        "embedding": {"base_url": provider.base_url, "model": "hash-4", "api_key_env": "FLOWPOOL_TEST_CANARY"}})

    assert response.status_code == 400 and "FLOWPOOL_TEST_CANARY" in error_of(response)["message"]
