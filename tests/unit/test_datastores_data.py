"""Datastore specs, record bodies and bad data: each bad case is a 400 that names it and stores nothing."""
from __future__ import annotations

import ipaddress
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from flowpool.blobs import RedisBlobs
from flowpool.datastores import DatastoreNotFound, Datastores, parse_records
from flowpool.datastores.embedding import EmbeddingClient
from flowpool.egress import EgressPolicy
from flowpool.errors import Conflict, RequestError, UpstreamError
from flowpool.registry import ProviderKeys
from flowpool.settings import Settings

ACCOUNT = "acct-a"
SPEC = {"name": "docs", "id_field": "id", "text_fields": ["text"], "vector_field": "vec", "vector_dims": 3,
        "filters": ["lang"]}


@pytest.fixture
def store(redis_db: redis.Redis, tmp_path: Path) -> Datastores:
    engine = Datastores(redis_db, RedisBlobs(redis_db),
                        Settings(cache_dir=str(tmp_path), datastore_batch_max_records=5,
                                 datastore_record_max_bytes=300))
    engine.create(ACCOUNT, SPEC)
    engine.ingest(ACCOUNT, "docs", [{"id": "a", "text": "apple", "vec": [1, 0, 0], "lang": "en"}])
    return engine


def test_json_array_jsonl_and_csv_give_the_same_records() -> None:
    records = [{"id": "1", "text": "one, two", "vec": [1.5, 0, 2]}, {"id": "2", "text": "three \"q\"", "vec": None}]
    jsonl = "\n".join(json.dumps(r) for r in records).encode()
    csv = b'id,text,vec\n1,"one, two","[1.5, 0, 2]"\n2,"three ""q""",\n'

    assert parse_records(json.dumps(records).encode(), "application/json") == records
    assert parse_records(jsonl + b"\n\n", "application/x-ndjson; charset=utf-8") == records
    assert parse_records(csv, "text/csv", vector_field="vec") == records
    assert parse_records(csv, "text/csv")[0]["vec"] == "[1.5, 0, 2]"  # only the vector column is read as JSON


def test_jsonl_lines_end_only_at_newlines() -> None:
    """U+2028, U+2029 and U+0085 may stand unescaped in a JSON string: they do not end a JSONL line."""
    texts = ["a\u2028b", "c\u2029d", "e\x85f"]
    body = "\r\n".join(json.dumps({"id": str(i), "text": t}, ensure_ascii=False) for i, t in enumerate(texts))

    assert [r["text"] for r in parse_records(body.encode(), "application/x-ndjson")] == texts
    more = '\n{"id": "9", "text": "x\u2028y"}\n{oops'
    with pytest.raises(RequestError, match="line 5: malformed JSON"):
        parse_records((body + more).encode(), "application/x-ndjson")


@pytest.mark.parametrize(("body", "content_type", "message"), [
    (b'{"id": "1"}\n{"id": 2,\n{"id": "3"}', "application/x-ndjson", "line 2: malformed JSON"),
    (b'{"id": "1"}\n\n[1, 2]\n', "application/jsonl", "line 3: a record must be a JSON object"),
    (b'id,text\n1,a\n2,b,extra\n3,c\n', "text/csv", "line 3: 3 values for 2 columns"),
    (b'id,text\n1,"open\n', "text/csv", "line 2: malformed CSV"),
    (b'id,vec\n1,[1\n', "text/csv", None),
    (b'[{"id": 1}, 5]', "application/json", "record 2: must be an object"),
    (b'[{"id": 1},', "application/json", "line 1: malformed JSON"),
    (b'id\n1\n', "text/plain", "not 'text/plain'"),
    (b'\xff\xfe', "text/csv", "not UTF-8"),
])
def test_a_malformed_body_is_a_400_naming_the_line(body: bytes, content_type: str, message: str | None) -> None:
    with pytest.raises(RequestError, match=message or "line 2: the 'vec' column must hold a JSON array"):
        parse_records(body, content_type, vector_field="vec")


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "bad name"}, "invalid datastore name"),
    ({"name": "s", "text_fields": "text"}, "text_fields must be a list"),
    ({"name": "s", "vector_field": "v"}, "vector_dims must be an integer from 1 to 4096"),
    ({"name": "s", "vector_field": "v", "vector_dims": 5000}, "vector_dims must be"),
    ({"name": "s", "vector_dims": 3}, "vector_dims needs a vector_field"),
    ({"name": "s", "colour": "red"}, "unknown field 'colour'"),
    ({"name": "s", "text_fields": ["t"], "vector_field": "v", "vector_dims": 3,
      "embedding": {"base_url": "ftp://x", "model": "m"}}, "embedding.base_url"),
    ({"name": "s", "embedding": {"base_url": "http://127.0.0.1:1", "model": "m"}}, "embedding needs a vector_field"),
])
def test_a_bad_spec_is_a_400_naming_the_field(store: Datastores, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        store.create(ACCOUNT, spec)


def test_a_second_store_of_one_name_is_a_409(store: Datastores) -> None:
    with pytest.raises(Conflict):
        store.create(ACCOUNT, SPEC)


def _snapshot(store: Datastores, redis_db: redis.Redis) -> tuple[Any, ...]:
    return (store.get(ACCOUNT, "docs"), sorted(redis_db.keys("*")),
            store.search(ACCOUNT, "docs", query="apple pear"), store.get_record(ACCOUNT, "docs", "a"))


@pytest.mark.parametrize(("records", "message"), [
    ([{"id": "b", "text": "pear", "vec": [1, 0]}], "record 'b': 'vec' has 2 dimensions; the store's vectors have 3"),
    ([{"id": "b", "text": "pear", "vec": [1, 0, 0]}, {"id": "c", "text": "x", "vec": [1, "2", 0]}],
     "record 'c': 'vec' must be a list of numbers"),
    ([{"id": "b", "text": "pear", "vec": [1, 0, float("nan")]}], "record 'b'.*not a finite number"),
    ([{"id": "b", "text": "pear"}, {"text": "no id"}], "record 2: the id field 'id' must be a string or an integer"),
    ([{"id": True, "text": "pear"}], "record 1: the id field"),
    ([{"id": "b", "text": "pear"}, "not a record"], "record 2: must be an object"),
    ([{"id": f"r{i}"} for i in range(6)], "6 records in one request; at most 5"),
    ([{"id": "big", "text": "x" * 400}], "record 'big': .* bytes as JSON; at most 300"),
    ([{"id": "b", "text": "pear", "vec": "[1, 2"}], "record 'b': 'vec' must be a list of numbers"),
    ([{"id": "b", "text": "pear", "vec": "[1, 0, 0]"}], "record 'b': 'vec' must be a list of numbers"),
    ([{"id": "b", "text": "pear", "vec": [1e39, 0, 0]}], "record 'b'.*not a finite number"),
    ([{"id": "b", "text": "pear", "vec": [1, 0, 0]}, {"id": "c", "vec": [0, -1e39, 0]}], "record 'c'.*not a finite"),
])
def test_a_bad_record_is_a_400_naming_it_and_the_store_is_unchanged(
        store: Datastores, redis_db: redis.Redis, records: list[Any], message: str) -> None:
    before = _snapshot(store, redis_db)

    with pytest.raises(RequestError, match=message):
        store.ingest(ACCOUNT, "docs", records)

    assert _snapshot(store, redis_db) == before


def test_a_csv_ingest_reads_vectors_from_json_cells(store: Datastores) -> None:
    records = parse_records(b'id,text,vec,lang\n7,pear,"[0, 1, 0]",fr\n8,plum,,fr\n', "text/csv",
                            vector_field="vec")

    assert store.ingest(ACCOUNT, "docs", records) == {"upserted": 2, "version": 2}

    assert store.get_record(ACCOUNT, "docs", "7") == {"id": "7", "text": "pear", "vec": [0, 1, 0], "lang": "fr"}
    assert store.get_record(ACCOUNT, "docs", "8") == {"id": "8", "text": "plum", "lang": "fr"}
    assert [hit["id"] for hit in store.search(ACCOUNT, "docs", vector=[0, 1, 0.1], limit=5)["data"]] == ["7", "a"]


def test_another_accounts_store_is_a_404_everywhere(store: Datastores) -> None:
    other = "acct-b"
    calls = [lambda: store.get(other, "docs"), lambda: store.search(other, "docs", query="apple"),
             lambda: store.get_record(other, "docs", "a"), lambda: store.ingest(other, "docs", [{"id": "x"}]),
             lambda: store.delete_records(other, "docs", ["a"]), lambda: store.delete(other, "docs")]

    for call in calls:
        with pytest.raises(DatastoreNotFound) as caught:
            call()
        assert caught.value.status == 404
    assert store.list(other) == []
    assert store.get_record(ACCOUNT, "docs", "a") is not None


def test_two_accounts_stores_of_one_name_never_see_each_other(store: Datastores) -> None:
    other = "acct-b"
    store.create(other, SPEC)
    store.ingest(other, "docs", [{"id": "b", "text": "banana", "vec": [0, 1, 0], "lang": "fr"},
                                 {"id": "a", "text": "apricot", "vec": [0, 0, 1], "lang": "fr"}])
    store.delete_records(other, "docs", ["a"])  # B's delete of id "a" leaves A's record "a"

    assert store.get_record(ACCOUNT, "docs", "a")["text"] == "apple"
    assert store.get_record(ACCOUNT, "docs", "b") is None
    assert store.get_record(other, "docs", "a") is None
    assert [h["id"] for h in store.search(ACCOUNT, "docs", query="banana apple")["data"]] == ["a"]
    assert [h["id"] for h in store.search(other, "docs", query="banana apple")["data"]] == ["b"]
    assert [h["id"] for h in store.search(ACCOUNT, "docs", vector=[0, 1, 0], limit=5)["data"]] == ["a"]
    assert [h["id"] for h in store.search(other, "docs", vector=[1, 0, 0], limit=5)["data"]] == ["b"]
    assert (store.get(ACCOUNT, "docs")["records"], store.get(other, "docs")["records"]) == (1, 1)
    store.delete(other, "docs")
    assert store.search(ACCOUNT, "docs", query="apple")["data"][0]["id"] == "a"


def test_a_name_that_is_not_a_store_name_is_a_404(store: Datastores) -> None:
    """A name from a URL or a run reaches Redis keys only when it is a valid store name (else WRONGTYPE, a 500)."""
    generation = store.manifests.read(ACCOUNT, "docs").generation
    for name in (f"docs:{generation}:log", "docs:x", "", "a b"):
        for call in (lambda: store.get(ACCOUNT, name), lambda: store.search(ACCOUNT, name, query="apple"),
                     lambda: store.get_record(ACCOUNT, name, "a"), lambda: store.ingest(ACCOUNT, name, [{"id": "x"}]),
                     lambda: store.delete_records(ACCOUNT, name, ["a"]), lambda: store.delete(ACCOUNT, name)):
            with pytest.raises(DatastoreNotFound):
                call()


def test_an_empty_ingest_or_delete_writes_nothing(store: Datastores, redis_db: redis.Redis) -> None:
    before = _snapshot(store, redis_db)

    assert store.ingest(ACCOUNT, "docs", []) == {"upserted": 0, "version": 1}
    assert store.delete_records(ACCOUNT, "docs", []) == {"deleted": 0, "version": 1}

    assert _snapshot(store, redis_db) == before


def test_integer_ids_are_strings(store: Datastores) -> None:
    store.ingest(ACCOUNT, "docs", [{"id": 7, "text": "seven"}])

    assert store.get_record(ACCOUNT, "docs", 7) == {"id": "7", "text": "seven"}  # type: ignore[arg-type]
    assert store.delete_records(ACCOUNT, "docs", [7])["deleted"] == 1


def test_a_deleted_store_is_gone_and_one_created_again_starts_empty(store: Datastores, redis_db: redis.Redis,
                                                                    tmp_path: Path) -> None:
    old_dirs = list((tmp_path / "datastores" / ACCOUNT / "docs").iterdir())

    store.delete(ACCOUNT, "docs")

    with pytest.raises(DatastoreNotFound):
        store.search(ACCOUNT, "docs", query="apple")
    assert redis_db.keys("*") == []  # manifest, log and batch blobs
    assert not any(d.exists() for d in old_dirs)
    store.create(ACCOUNT, SPEC)
    assert store.get_record(ACCOUNT, "docs", "a") is None
    assert store.search(ACCOUNT, "docs", query="apple")["data"] == []
    assert store.get(ACCOUNT, "docs")["version"] == 0


def test_search_arguments_are_checked(store: Datastores) -> None:
    with pytest.raises(RequestError, match="needs a query, a vector or both"):
        store.search(ACCOUNT, "docs")
    with pytest.raises(RequestError, match="'vec' has 2 dimensions"):
        store.search(ACCOUNT, "docs", vector=[1, 0])
    with pytest.raises(RequestError, match="limit"):
        store.search(ACCOUNT, "docs", query="apple", limit=0)


@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.1.1", "10.0.0.1", "192.168.1.1", "fe80::1", "::1",
                                     "::ffff:127.0.0.1"])
def test_the_egress_guard_refuses_private_and_link_local_embedding_hosts(address: str) -> None:
    assert EgressPolicy("").forbidden(ipaddress.ip_address(address)) is not None


def test_an_embedding_endpoint_on_a_refused_address_is_never_called(redis_db: redis.Redis, tmp_path: Path) -> None:
    """The engine's embedder goes through the egress guard: a store whose endpoint is on this host (loopback, not
    in FLOWPOOL_EGRESS_ALLOW) gets a 502 and nothing is stored, and the endpoint hears nothing."""
    heard: list[str] = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            heard.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"data": [{"embedding": [1, 0, 0]}]}')

        def log_message(self, *args: Any) -> None:
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        embedder = EmbeddingClient("", ProviderKeys(""), {}, connect_timeout=2, timeout_seconds=5, retries=0)
        engine = Datastores(redis_db, RedisBlobs(redis_db), Settings(cache_dir=str(tmp_path)), embedder=embedder)
        engine.create(ACCOUNT, {**SPEC, "embedding": {"base_url": f"http://127.0.0.1:{server.server_port}/v1",
                                                      "model": "m"}})

        with pytest.raises(UpstreamError, match="may not be reached") as refused:
            engine.ingest(ACCOUNT, "docs", [{"id": "a", "text": "apple"}])

        assert refused.value.status == 502
        assert heard == []
        assert engine.get(ACCOUNT, "docs")["version"] == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
