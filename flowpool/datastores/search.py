"""Reading a replica: a record by id, BM25 keyword search, exact cosine search, their fusion, equality filters.

- Keyword: the query's words (letters and digits; everything else separates
  them, as FTS5's unicode61 tokenizer does) become quoted FTS5 terms joined
  by OR, so no query text is ever read as FTS5 syntax; ranked by FTS5's
  ``bm25()`` (k1 = 1.2, b = 0.75) over the text fields, negated so that a
  higher score is better. Words held by at least half the records are left
  out of the search when it can do without them (see ``keyword_hits``).
- Vector: the cosine of the query with every live stored vector (one
  matrix-vector product, times each row's 1/norm), top k by
  ``argpartition``; exact, so recall is 1.0.
- Hybrid: reciprocal rank fusion, ``sum(1 / (60 + rank))`` over the two
  rankings, each cut at the larger of the limit and
  FLOWPOOL_DATASTORE_HYBRID_CANDIDATES.
- Filters: ``{field: value}`` (or ``{field: [values]}``, any of them) on the
  store's declared filter fields, all of them at once.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowpool.errors import RequestError

from .replica import Replica
from .spec import Spec, filter_values

__all__ = ["COMMON_WORD_BOUND", "RRF_K", "check_filters", "get_record", "keyword_hits", "records_of",
           "rrf", "vector_hits"]

RRF_K = 60
_WORD = re.compile(r"[^\W_]+")
_MAX_TERMS = 64
# FTS5's bm25() gives a word held by n of N records idf = ln((N - n + 0.5) / (n + 0.5)), or 1e-6 where that is
# <= 0 (n >= N / 2); such a word adds less than 1e-6 x (k1 + 1) to any record's score.
COMMON_WORD_BOUND = 1e-6 * 2.2
# Document counts remembered per replica state, at most.
_COUNTS_KEPT = 4096
# Above this share of the store, a filtered vector search scans everything under a mask instead of gathering rows.
_GATHER_SHARE = 0.25


def _terms(text: str) -> list[str]:
    """The distinct words of user text, case folded, in order (at most _MAX_TERMS)."""
    terms: dict[str, None] = {}
    for word in _WORD.findall(text):
        terms.setdefault(word.casefold(), None)
    return list(terms)[:_MAX_TERMS]


def _match(terms: list[str]) -> str:
    return " OR ".join(f'"{term}"' for term in terms)


def check_filters(spec: Spec, filters: Any) -> list[tuple[str, list[str]]]:
    """``filters`` as (field, canonical values) pairs; a 400 for a field the store did not declare."""
    if not filters:
        return []
    if not isinstance(filters, dict):
        raise RequestError("filters must be an object {field: value}", param="filters")
    out = []
    for name, value in filters.items():
        if name not in spec.filters:
            declared = ", ".join(spec.filters) or "none"
            raise RequestError(f"filter on {name!r}: the store's filter fields are {declared}", param="filters")
        values = filter_values(value)
        if not values or (isinstance(value, list) and len(values) != len(value)):
            raise RequestError(f"filter on {name!r}: a value is a string, number, boolean or null, or a list of "
                               "them (any of)", param="filters")
        out.append((name, values))
    return out


def _filter_sql(filters: list[tuple[str, list[str]]], column: str, each: bool = False) -> tuple[str, list[Any]]:
    """SQL keeping the rids in ``column`` that pass ``filters``: as a set (IN), or looked up row by row (EXISTS)."""
    clauses, params = [], []
    for name, values in filters:
        marks = ",".join("?" * len(values))
        if each:
            clauses.append(f"EXISTS (SELECT 1 FROM filters WHERE field = ? AND value IN ({marks}) AND rid = {column})")
        else:
            clauses.append(f"{column} IN (SELECT rid FROM filters WHERE field = ? AND value IN ({marks}))")
        params += [name, *values]
    return " AND ".join(clauses), params


def keyword_hits(replica: Replica, query: str, limit: int, filters: list[tuple[str, list[str]]],
                 prune: bool = True) -> list[tuple[int, float]]:
    """(rid, bm25 score) of the best ``limit`` matches, best first.

    FTS5 scores every record holding a query word, so a word held by most
    records makes a query visit most of the store, while its idf (clamped to
    1e-6) adds under COMMON_WORD_BOUND to a score. With ``prune``, such words
    are left out of the MATCH when other words remain and those match at
    least ``limit`` records (else the full query runs). Each score then
    lacks at most COMMON_WORD_BOUND per word left out, and a record the full
    query would rank in is out only if it is within that of the last one
    kept: results equal the full query's to that tolerance (the tests
    check it against a brute-force BM25). ``prune=False``: always the full
    query (the benchmark compares both).
    """
    terms = _terms(query)
    if not terms or not replica.spec.text_fields:
        return []
    where, params = _filter_sql(filters, "rowid")
    sql = ("SELECT rowid, -bm25(fts) FROM fts WHERE fts MATCH ?" + (f" AND {where}" if where else "")
           + " ORDER BY bm25(fts), rowid LIMIT ?")
    with replica.reader() as conn:
        conn.execute("BEGIN")  # one snapshot for the word counts and the search
        try:
            kept = _distinctive(conn, replica, terms) if prune else terms
            hits = conn.execute(sql, [_match(kept), *params, limit]).fetchall()
            if len(kept) < len(terms) and len(hits) < limit:
                hits = conn.execute(sql, [_match(terms), *params, limit]).fetchall()
        finally:
            conn.execute("COMMIT")
    return [(rid, float(score)) for rid, score in hits]


@dataclass
class _Counts:
    """Of one state of a replica's FTS index: its rows (bm25's N) and the words' document counts looked up."""

    state: tuple  # the replica's meta rows (applied seq, reset epoch, ...): any batch or reset changes them
    rows: int
    docs: dict[str, int] = field(default_factory=dict)


_counts: weakref.WeakKeyDictionary[Replica, _Counts] = weakref.WeakKeyDictionary()
_counts_lock = threading.Lock()


def _distinctive(conn: sqlite3.Connection, replica: Replica, terms: list[str]) -> list[str]:
    """``terms`` less those held by at least half the indexed records (all of them if every one is)."""
    state = tuple(conn.execute("SELECT key, value FROM meta ORDER BY key"))
    with _counts_lock:
        counts = _counts.get(replica)
    if counts is None or counts.state != state:
        # The records in the fts index (bm25's N), kept by every apply: counting fts_docsize would scan it.
        counts = _Counts(state, dict(state)["indexed"])
        with _counts_lock:
            _counts[replica] = counts
    docs = {term: counts.docs.get(term) for term in terms}
    missing = [term for term, n in docs.items() if n is None]
    if missing:
        # A word the index spells differently (diacritics) is not found here, counts 0 and stays in the query.
        found = dict(conn.execute(f"SELECT term, doc FROM fts_vocab WHERE term IN ({','.join('?' * len(missing))})",
                                  missing))
        if len(counts.docs) > _COUNTS_KEPT:
            counts.docs = {}
        for term in missing:
            docs[term] = counts.docs[term] = found.get(term, 0)
    kept = [term for term in terms if 2 * docs[term] < counts.rows]  # 2n >= N: idf clamped to 1e-6
    return kept or terms


def vector_hits(replica: Replica, vector: np.ndarray, limit: int,
                filters: list[tuple[str, list[str]]]) -> list[tuple[int, float]]:
    """(rid, cosine) of the ``limit`` nearest live vectors, best first."""
    state = replica.state
    if state.vectors is None or not len(state.live):
        return []
    norm = float(np.linalg.norm(vector))
    query = (vector / norm if norm > 0 else vector).astype(np.float32)
    if filters and _matching(replica, filters) <= _GATHER_SHARE * len(state.live):
        where, params = _filter_sql(filters, "rid")
        with replica.reader() as conn:
            found = [row for (row,) in conn.execute(
                f"SELECT vrow FROM records WHERE vrow IS NOT NULL AND {where}", params)]
        rows = np.asarray([row for row in found if row < len(state.live)], dtype=np.int64)
        rows = rows[state.live[rows]]
        if not len(rows):
            return []
        scores = (state.vectors[rows] @ query) * state.inv_norms[rows]
    else:
        rows = None
        scores = np.where(state.live, np.asarray(state.vectors @ query, dtype=np.float32) * state.inv_norms, -np.inf)
        if filters:  # a broad filter: rank everything, then keep the best rows that pass it
            return _filtered_best(replica, scores, limit, filters)
    best = _top(scores, limit)
    chosen = best if rows is None else rows[best]
    with replica.reader() as conn:
        rid_of = _rids_of_rows(conn, [int(row) for row in chosen])
    return [(rid_of[int(row)], float(scores[i])) for i, row in zip(best, chosen)
            if int(row) in rid_of and np.isfinite(scores[i])]


def _matching(replica: Replica, filters: list[tuple[str, list[str]]]) -> int:
    """At most how many records pass ``filters`` (the count of the most selective one)."""
    with replica.reader() as conn:
        return min(conn.execute(f"SELECT count(*) FROM filters WHERE field = ? AND value IN ({','.join('?' * len(v))})",
                                [name, *v]).fetchone()[0] for name, v in filters)


def _filtered_best(replica: Replica, scores: np.ndarray, limit: int,
                   filters: list[tuple[str, list[str]]]) -> list[tuple[int, float]]:
    """The best ``limit`` rows that pass ``filters``, checking candidates best first, a slice at a time."""
    where, params = _filter_sql(filters, "records.rid", each=True)
    step = max(4 * limit, 256)
    order = _top(scores, min(len(scores), 16 * step))  # enough for all but the narrowest filters
    out: list[tuple[int, float]] = []
    for start in range(0, len(scores), step):
        if start >= len(order):
            order = _top(scores, len(scores))
        chunk = [int(row) for row in order[start:start + step] if np.isfinite(scores[row])]
        if not chunk:
            break
        marks = ",".join("?" * len(chunk))
        with replica.reader() as conn:
            passing = dict(conn.execute(f"SELECT vrow, rid FROM records WHERE vrow IN ({marks}) AND {where}",
                                        [*chunk, *params]))
        out += [(passing[row], float(scores[row])) for row in chunk if row in passing]
        if len(out) >= limit:
            break
    return out[:limit]


def _top(scores: np.ndarray, limit: int) -> np.ndarray:
    """Indexes of the ``limit`` highest scores, highest first (ties: lower index first)."""
    if len(scores) > limit:
        part = np.argpartition(-scores, limit - 1)[:limit]
    else:
        part = np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


def _rids_of_rows(conn: sqlite3.Connection, rows: list[int]) -> dict[int, int]:
    if not rows:
        return {}
    marks = ",".join("?" * len(rows))
    return {vrow: rid for rid, vrow in conn.execute(f"SELECT rid, vrow FROM records WHERE vrow IN ({marks})", rows)}


def records_of(replica: Replica, rids: list[int]) -> dict[int, dict[str, Any]]:
    """The records (without their vectors) of these rids; a rid deleted meanwhile is left out."""
    out: dict[int, dict[str, Any]] = {}
    with replica.reader() as conn:
        for start in range(0, len(rids), 500):
            chunk = rids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for rid, body in conn.execute(f"SELECT rid, body FROM records WHERE rid IN ({marks})", chunk):
                out[rid] = json.loads(body)
    return out


def get_record(replica: Replica, record_id: str) -> dict[str, Any] | None:
    """The record as ingested, its vector included (as stored: float32); None if there is none."""
    with replica.reader() as conn:
        row = conn.execute("SELECT body, vrow FROM records WHERE id = ?", (record_id,)).fetchone()
    if row is None:
        return None
    body, vrow = row
    record = json.loads(body)
    state = replica.state
    if replica.spec.vector_field and vrow is not None and state.vectors is not None and vrow < len(state.live):
        record[replica.spec.vector_field] = state.vectors[vrow].tolist()
    return record


def rrf(rankings: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of best-first rankings: (rid, sum of 1 / (60 + rank)), best first (ties: rid)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (rid, _) in enumerate(ranking, start=1):
            fused[rid] = fused.get(rid, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))
