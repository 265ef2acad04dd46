"""The datastore engine's search against brute-force references, on generated data and a real Redis.

Keyword scores are checked against BM25 computed here with FTS5's formula
(k1 = 1.2, b = 0.75, idf = ln((N - n + 0.5) / (n + 0.5)), at least 1e-6),
vector results against exact cosine top-k in numpy, the hybrid against
reciprocal rank fusion of those two references. A keyword search may leave
out words held by at least half the records (idf 1e-6); its results then
equal the reference to within COMMON_WORD_BOUND per word left out.
"""
from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from flowpool.blobs import RedisBlobs
from flowpool.datastores import Datastores
from flowpool.datastores.search import COMMON_WORD_BOUND
from flowpool.errors import RequestError
from flowpool.settings import Settings

ACCOUNT = "acct-a"
DIMS = 16
WORDS = [f"w{i}" for i in range(60)]
LANGS = ["en", "fr"]
TAGS = [f"t{i}" for i in range(12)]


def engine(client: redis.Redis, cache: Path, **settings: Any) -> Datastores:
    return Datastores(client, RedisBlobs(client), Settings(cache_dir=str(cache), **settings))


def corpus(count: int = 300, seed: int = 7) -> list[dict[str, Any]]:
    """Records with Zipf-like word use (so idf varies), a random vector, a language and a tag."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(WORDS))]
    records = []
    for i in range(count):
        title = " ".join(rng.choices(WORDS, weights, k=rng.randint(1, 5)))
        body = " ".join(rng.choices(WORDS, weights, k=rng.randint(3, 40)))
        vector = [rng.gauss(0, 1) for _ in range(DIMS)]
        records.append({"id": f"r{i}", "title": title, "body": body, "vec": vector,
                        "lang": LANGS[i % 2], "tag": TAGS[i % len(TAGS)], "n": i})
    return records


SPEC = {"name": "docs", "id_field": "id", "text_fields": ["title", "body"], "vector_field": "vec",
        "vector_dims": DIMS, "filters": ["lang", "tag"]}


def bm25_reference(records: list[dict[str, Any]], query: str) -> list[tuple[str, float]]:
    """(id, score) of every record matching a word of ``query``, best first (ties: ingest order)."""
    docs = [re.findall(r"[^\W_]+", f"{r['title']}\n{r['body']}".casefold()) for r in records]
    n_docs, avgdl = len(docs), sum(len(d) for d in docs) / len(docs)
    terms = list(dict.fromkeys(re.findall(r"[^\W_]+", query.casefold())))
    scored = []
    for index, (record, tokens) in enumerate(zip(records, docs)):
        score, matched = 0.0, False
        for term in terms:
            tf = tokens.count(term)
            containing = sum(1 for d in docs if term in d)
            idf = math.log((n_docs - containing + 0.5) / (containing + 0.5))
            idf = idf if idf > 0 else 1e-6
            score += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(tokens) / avgdl))
            matched = matched or tf > 0
        if matched:
            scored.append((index, record["id"], score))
    scored.sort(key=lambda item: (-item[2], item[0]))
    return [(rid, score) for _, rid, score in scored]


def cosine_reference(records: list[dict[str, Any]], vector: list[float]) -> list[tuple[str, float]]:
    matrix = np.asarray([r["vec"] for r in records], dtype=np.float64)
    query = np.asarray(vector, dtype=np.float64)
    scores = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")
    return [(records[i]["id"], float(scores[i])) for i in order]


def rrf_reference(*rankings: list[tuple[str, float]]) -> list[str]:
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, (rid, _) in enumerate(ranking, start=1):
            fused[rid] = fused.get(rid, 0.0) + 1 / (60 + rank)
    # Ties go to the record ingested first (the engine breaks them by its row id).
    return [rid for rid, _ in sorted(fused.items(), key=lambda item: (-item[1], int(item[0][1:])))]


@pytest.fixture
def loaded(redis_db: redis.Redis, tmp_path: Path) -> tuple[Datastores, list[dict[str, Any]]]:
    """A store of 300 generated records, ingested in three batches."""
    store = engine(redis_db, tmp_path / "host-a")
    store.create(ACCOUNT, SPEC)
    records = corpus()
    for start in range(0, len(records), 100):
        store.ingest(ACCOUNT, "docs", records[start:start + 100])
    return store, records


def ids(result: dict[str, Any]) -> list[str]:
    return [hit["id"] for hit in result["data"]]


def assert_bm25_top(result: dict[str, Any], records: list[dict[str, Any]], query: str, limit: int) -> None:
    """The hits are a top ``limit`` of the reference BM25, scores and order to within the pruning tolerance."""
    reference = bm25_reference(records, query)
    expected, score_of = reference[:limit], dict(reference)
    tolerance = COMMON_WORD_BOUND * len(set(re.findall(r"[^\W_]+", query.casefold()))) + 1e-9
    assert len(result["data"]) == len(expected)
    for hit, (_, rank_score) in zip(result["data"], expected):
        assert hit["id"] in score_of
        assert hit["scores"]["keyword"] == pytest.approx(score_of[hit["id"]], abs=tolerance)
        # In the reference's top, near-ties aside.
        assert score_of[hit["id"]] == pytest.approx(rank_score, abs=tolerance)


@pytest.mark.parametrize("query", ["w3", "w0 w5", "w17 w40 w2", "W12, w59!", "w0 w1 w2 w25 w31"])
def test_keyword_ranking_and_scores_match_a_brute_force_bm25(loaded: Any, query: str) -> None:
    store, records = loaded
    result = store.search(ACCOUNT, "docs", query=query, limit=20)

    assert result["mode"] == "keyword"
    assert_bm25_top(result, records, query, 20)
    assert all(hit["score"] > 0 for hit in result["data"])
    assert result["data"][0]["record"] == {k: v for k, v in records[int(result["data"][0]["id"][1:])].items()
                                           if k != "vec"}


def holding(records: list[dict[str, Any]], word: str) -> int:
    return sum(1 for r in records if word in re.findall(r"[^\W_]+", f"{r['title']}\n{r['body']}"))


def test_words_in_half_the_records_are_left_out_when_the_rest_fill_the_limit(loaded: Any) -> None:
    store, records = loaded
    assert holding(records, "w0") >= len(records) / 2 > holding(records, "w30") >= 10

    pruned = store.search(ACCOUNT, "docs", query="w0 w30", limit=10)

    # Scored without w0 (idf 1e-6): exactly the BM25 of w30 alone, and the full query's to within the bound.
    assert [hit["scores"]["keyword"] for hit in pruned["data"]] == pytest.approx(
        [score for _, score in bm25_reference(records, "w30")[:10]], rel=1e-12)
    assert_bm25_top(pruned, records, "w0 w30", 10)


def test_the_full_query_runs_when_the_distinctive_words_match_too_few(loaded: Any) -> None:
    store, records = loaded
    rare = holding(records, "w30")
    for query, filters in (("w0 w30", None), ("w0 w1 w30", None), ("w30 w0", {"lang": "en"})):
        keep = [r for r in records if not filters or r["lang"] == "en"]
        expected = [(rid, score) for rid, score in bm25_reference(records, query)
                    if rid in {r["id"] for r in keep}][:rare + 5]

        result = store.search(ACCOUNT, "docs", query=query, limit=rare + 5, filters=filters)

        assert ids(result) == [rid for rid, _ in expected], query
        assert [hit["score"] for hit in result["data"]] == pytest.approx([s for _, s in expected], rel=1e-12)


def test_only_common_words_are_searched_as_they_are(loaded: Any) -> None:
    store, records = loaded
    expected = bm25_reference(records, "w0 w1")[:10]

    result = store.search(ACCOUNT, "docs", query="w0 w1", limit=10)

    assert ids(result) == [rid for rid, _ in expected]
    assert [hit["score"] for hit in result["data"]] == pytest.approx([s for _, s in expected], rel=1e-12)


def test_a_word_turning_common_after_an_ingest_is_left_out_from_then_on(loaded: Any) -> None:
    store, records = loaded
    before = store.search(ACCOUNT, "docs", query="w20 w31", limit=5)
    assert before["data"][0]["score"] == pytest.approx(bm25_reference(records, "w20 w31")[0][1], rel=1e-12)
    extra = [{"id": f"x{i}", "title": "w20", "body": "w20 w2", "vec": [1.0] * DIMS, "lang": "en", "tag": "t0",
              "n": 1000 + i} for i in range(300)]
    extra.append({"id": "y0", "title": "w31 w20", "body": "w31", "vec": [1.0] * DIMS, "lang": "en", "tag": "t0",
                  "n": 2000})  # holds both words: first, and its score is w31's alone once w20 is left out
    store.ingest(ACCOUNT, "docs", extra)
    records = records + extra

    after = store.search(ACCOUNT, "docs", query="w20 w31", limit=5)

    assert after["data"][0]["id"] == "y0"
    assert [hit["score"] for hit in after["data"]] == pytest.approx(
        [score for _, score in bm25_reference(records, "w31")[:5]], rel=1e-12)
    assert_bm25_top(after, records, "w20 w31", 5)


def test_query_text_is_never_read_as_fts_syntax(loaded: Any) -> None:
    store, records = loaded

    for query in ['w1 AND NOT w2', '"w1', 'w1*', 'title:w1', 'NEAR(w1 w2)', '(w1', '']:
        result = store.search(ACCOUNT, "docs", query=query, limit=5)
        words = [w for w in re.findall(r"[^\W_]+", query.casefold())]
        expected = bm25_reference(records, " ".join(words))[:5] if words else []
        assert ids(result) == [rid for rid, _ in expected], query


def test_vector_results_match_exact_cosine_top_k(loaded: Any) -> None:
    store, records = loaded
    rng = random.Random(1)
    for _ in range(5):
        query = [rng.gauss(0, 1) for _ in range(DIMS)]
        expected = cosine_reference(records, query)[:10]

        result = store.search(ACCOUNT, "docs", vector=query, limit=10)

        assert result["mode"] == "vector"
        assert ids(result) == [rid for rid, _ in expected]
        assert [hit["score"] for hit in result["data"]] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_the_hybrid_is_the_reciprocal_rank_fusion_of_both_rankings(redis_db: redis.Redis, tmp_path: Path) -> None:
    store = engine(redis_db, tmp_path, datastore_hybrid_candidates=30)
    store.create(ACCOUNT, SPEC)
    records = corpus()
    store.ingest(ACCOUNT, "docs", records)
    rng = random.Random(3)
    query, vector = "w8 w21", [rng.gauss(0, 1) for _ in range(DIMS)]
    keyword, nearest = bm25_reference(records, query)[:30], cosine_reference(records, vector)[:30]

    result = store.search(ACCOUNT, "docs", query=query, vector=vector, limit=10)

    assert result["mode"] == "hybrid"
    assert ids(result) == rrf_reference(keyword, nearest)[:10]
    by_keyword, by_vector = dict(keyword), dict(nearest)
    for hit in result["data"]:
        assert hit["scores"]["keyword"] == (pytest.approx(by_keyword[hit["id"]]) if hit["id"] in by_keyword else None)
        assert hit["scores"]["vector"] == (pytest.approx(by_vector[hit["id"]], abs=1e-5)
                                           if hit["id"] in by_vector else None)


@pytest.mark.parametrize("filters", [{"lang": "fr"}, {"tag": "t3"}, {"tag": ["t2", "t3"], "lang": "en"}])
def test_filters_keep_only_matching_records_in_every_mode(loaded: Any, filters: dict[str, Any]) -> None:
    store, records = loaded

    def keep(record: dict[str, Any]) -> bool:
        return all(record[k] in (v if isinstance(v, list) else [v]) for k, v in filters.items())
    subset = [r for r in records if keep(r)]
    assert 0 < len(subset) < len(records)
    rng = random.Random(5)
    vector = [rng.gauss(0, 1) for _ in range(DIMS)]

    keyword = store.search(ACCOUNT, "docs", query="w1 w4", limit=15, filters=filters)
    nearest = store.search(ACCOUNT, "docs", vector=vector, limit=15, filters=filters)

    assert ids(keyword) == [rid for rid, _ in bm25_reference(records, "w1 w4") if rid in {r["id"] for r in subset}][:15]
    assert ids(nearest) == [rid for rid, _ in cosine_reference(subset, vector)][:15]
    assert all(keep(hit["record"]) for hit in keyword["data"] + nearest["data"])


def test_a_filter_on_an_undeclared_field_is_a_400(loaded: Any) -> None:
    store, _ = loaded

    with pytest.raises(RequestError, match="'n'.*lang, tag"):
        store.search(ACCOUNT, "docs", query="w1", filters={"n": 3})


def test_an_update_replaces_text_and_vector_and_a_delete_removes_the_record(loaded: Any) -> None:
    store, records = loaded
    old = records[0]
    unit = [0.0] * DIMS
    unit[0] = 1.0

    store.ingest(ACCOUNT, "docs", [{"id": old["id"], "title": "zebra", "body": "quagga", "vec": unit,
                                    "lang": "fr", "tag": "t9"}])

    assert store.get_record(ACCOUNT, "docs", old["id"]) == {"id": old["id"], "title": "zebra", "body": "quagga",
                                                            "vec": unit, "lang": "fr", "tag": "t9"}
    assert ids(store.search(ACCOUNT, "docs", query="zebra")) == [old["id"]]
    old_words = set(re.findall(r"\w+", old["title"] + " " + old["body"]))
    rare = min(old_words, key=lambda w: sum(w in (r["title"] + " " + r["body"]).split() for r in records))
    assert old["id"] not in ids(store.search(ACCOUNT, "docs", query=rare, limit=300))
    assert ids(store.search(ACCOUNT, "docs", vector=unit, limit=1)) == [old["id"]]
    assert old["id"] not in ids(store.search(ACCOUNT, "docs", vector=old["vec"], limit=5))
    assert old["id"] not in ids(store.search(ACCOUNT, "docs", query="w1", filters={"tag": old["tag"]}, limit=300))
    assert store.get(ACCOUNT, "docs")["records"] == 300

    assert store.delete_records(ACCOUNT, "docs", [old["id"], "r1", "no-such-id"])["deleted"] == 2

    assert store.get_record(ACCOUNT, "docs", old["id"]) is None
    assert store.search(ACCOUNT, "docs", query="zebra")["data"] == []
    assert "r1" not in ids(store.search(ACCOUNT, "docs", vector=records[1]["vec"], limit=5))
    assert store.get(ACCOUNT, "docs")["records"] == 298


def test_get_by_id_gives_the_record_as_ingested(loaded: Any) -> None:
    store, records = loaded

    got = store.get_record(ACCOUNT, "docs", "r42")

    assert {k: v for k, v in got.items() if k != "vec"} == {k: v for k, v in records[42].items() if k != "vec"}
    assert got["vec"] == pytest.approx(records[42]["vec"], rel=1e-6)
    assert store.get_record(ACCOUNT, "docs", "r-missing") is None


def test_integer_ids_are_strings(redis_db: redis.Redis, tmp_path: Path) -> None:
    store = engine(redis_db, tmp_path)
    store.create(ACCOUNT, {"name": "nums", "text_fields": ["t"]})

    store.ingest(ACCOUNT, "nums", [{"id": 7, "t": "seven"}])

    assert store.get_record(ACCOUNT, "nums", "7") == {"id": "7", "t": "seven"}
    assert store.search(ACCOUNT, "nums", query="seven")["data"][0]["id"] == "7"


def test_the_embedder_fills_missing_vectors_and_turns_a_query_into_a_hybrid(
        redis_db: redis.Redis, tmp_path: Path) -> None:
    calls: list[tuple[dict, list[str]]] = []

    def embed(config: dict, texts: list[str]) -> list[list[float]]:
        calls.append((config, texts))
        return [[float(text.count(word)) + 0.01 for word in ("alpha", "beta", "gamma")] for text in texts]
    store = Datastores(redis_db, RedisBlobs(redis_db), Settings(cache_dir=str(tmp_path)), embedder=embed)
    config = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    store.create(ACCOUNT, {"name": "emb", "text_fields": ["t"], "vector_field": "v", "vector_dims": 3,
                           "embedding": config})

    store.ingest(ACCOUNT, "emb", [{"id": "a", "t": "alpha alpha"}, {"id": "b", "t": "beta", "v": [0, 0, 1]},
                                  {"id": "c", "t": "gamma gamma gamma"}])
    result = store.search(ACCOUNT, "emb", query="gamma")

    assert calls[0] == (config, ["alpha alpha", "gamma gamma gamma"])
    assert store.get_record(ACCOUNT, "emb", "a")["v"] == pytest.approx([2.01, 0.01, 0.01], rel=1e-6)
    assert store.get_record(ACCOUNT, "emb", "b")["v"] == [0, 0, 1]
    assert calls[1] == (config, ["gamma"])
    assert result["mode"] == "hybrid" and ids(result)[0] == "c"
    assert result["data"][0]["scores"]["vector"] > 0.99
