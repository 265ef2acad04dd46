"""Keyword search cost in the datastore engine, with and without leaving out words held by half the records.

    python bench/datastore_keyword_bench.py [--records 100000] [--queries 300]

Engine only (no HTTP, no ctx round trip): a Redis of its own, the records of
``datastore_bench.py``'s generator (about 200 Zipf-distributed words each,
no vectors) ingested through ``Datastores.ingest``, then keyword queries of
three words timed two ways on the same replica:

- ``pruned``: ``keyword_hits`` as searches run it (words in at least half
  the records left out when the rest match enough records);
- ``full``: ``keyword_hits(prune=False)``, every word scored.

Two query mixes: "distinctive words" (the 100 most common words left out, as
``datastore_bench.py`` draws them) and "words drawn from record text as is"
(by their frequency, so often words found in most records). Each at limit 10
and at 100 (the hybrid's candidates from the keyword side). It also checks
that both ways agree: the same records, scores within COMMON_WORD_BOUND per
word left out. Numbers vary with the machine; nothing here is a test.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from datastore_bench import COMMON, Corpus, percentile  # noqa: E402

from flowpool.blobs import RedisBlobs  # noqa: E402
from flowpool.datastores import Datastores  # noqa: E402
from flowpool.datastores.search import COMMON_WORD_BOUND, keyword_hits  # noqa: E402
from flowpool.redis_server import RedisServer  # noqa: E402
from flowpool.settings import Settings  # noqa: E402

ACCOUNT, NAME = "bench", "words"
WORDS_PER_QUERY = 3


def load(store: Datastores, corpus: Corpus, count: int, batch: int = 2000) -> float:
    """Ingest ``count`` generated records (text only); seconds taken."""
    started = time.perf_counter()
    records = []
    for rid, text, _ in corpus.records(count):
        records.append({"id": rid, "text": text})
        if len(records) == batch:
            store.ingest(ACCOUNT, NAME, records)
            records = []
            print(f"\r  {rid}", end="", file=sys.stderr, flush=True)
    if records:
        store.ingest(ACCOUNT, NAME, records)
    print(file=sys.stderr)
    return time.perf_counter() - started


def queries(corpus: Corpus, count: int, distinctive: bool) -> list[str]:
    """``count`` queries of words drawn by their frequency in the records; past the most common if ``distinctive``."""
    rng = np.random.default_rng(7 if distinctive else 8)
    out = []
    for ranks in corpus.words((count, 200)):
        if distinctive:
            ranks = ranks[ranks >= COMMON]
        out.append(" ".join(rng.choice(corpus.vocabulary[ranks], size=WORDS_PER_QUERY, replace=False)))
    return out


def timed(run: Callable[[str], list], texts: list[str]) -> tuple[list[float], list[list]]:
    times, results = [], []
    for text in texts:
        started = time.perf_counter()
        results.append(run(text))
        times.append((time.perf_counter() - started) * 1000)
    return times, results


def disagreements(pruned: list[list], full: list[list]) -> tuple[int, float]:
    """Queries whose records differ beyond near-ties, and the largest score difference of a record in both."""
    differ, largest = 0, 0.0
    tolerance = COMMON_WORD_BOUND * WORDS_PER_QUERY
    for mine, theirs in zip(pruned, full):
        score_of = dict(theirs)
        if len(mine) != len(theirs) or any(abs(a[1] - b[1]) > tolerance for a, b in zip(mine, theirs)):
            differ += 1
        largest = max([largest, *(abs(score - score_of[rid]) for rid, score in mine if rid in score_of)])
    return differ, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300, help="queries of each mix")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flowpool-kwbench-"))
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        store = Datastores(client, RedisBlobs(client), Settings(cache_dir=str(work)))
        store.create(ACCOUNT, {"name": NAME, "id_field": "id", "text_fields": ["text"]})
        corpus = Corpus()
        print(f"ingesting {args.records} records...", file=sys.stderr)
        seconds = load(store, corpus, args.records)
        replica = store._replica_at_head(ACCOUNT, NAME)[0]

        print(f"\nkeyword search, engine only: {args.records} records ({seconds:.0f} s to ingest), "
              f"{args.queries} queries of {WORDS_PER_QUERY} words per row")
        print(f"{'query words':<36} {'limit':>5} {'way':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}  agree")
        for title, distinctive in (("distinctive words", True), ("words drawn from record text as is", False)):
            texts = queries(corpus, args.queries, distinctive)
            for limit in (10, 100):
                keyword_hits(replica, texts[0], limit, [])  # warm the connection pool
                pruned, got = timed(lambda text: keyword_hits(replica, text, limit, []), texts)
                full, expected = timed(lambda text: keyword_hits(replica, text, limit, [], prune=False), texts)
                differ, largest = disagreements(got, expected)
                for way, times, note in (("pruned", pruned, f"{differ} differ, max |d score| {largest:.1e}"),
                                         ("full", full, "")):
                    print(f"{title:<36} {limit:>5} {way:>6} {statistics.median(times):>8.2f} "
                          f"{percentile(times, 99):>8.2f} {statistics.mean(times):>8.2f}  {note}")
        searched, _ = timed(lambda text: store.search(ACCOUNT, NAME, query=text, limit=10),
                            queries(corpus, args.queries, False))
        print(f"{'Datastores.search, record text as is':<36} {10:>5} {'pruned':>6} {statistics.median(searched):>8.2f} "
              f"{percentile(searched, 99):>8.2f} {statistics.mean(searched):>8.2f}  (with the head check and records)")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
