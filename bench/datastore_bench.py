"""Datastore benchmark: bulk ingest through the API, then searches timed from inside a run.

    python bench/datastore_bench.py [--records 100000] [--calls 300]

Starts its own Redis and a flowpool stack (one worker, the API), with a fresh
cache directory. Generates records of about 200 words drawn from a Zipf
vocabulary plus a 384-dimension vector from a clustered distribution, writes
them as JSONL batches the size ``flowpool datastore ingest`` sends (untimed),
then times their ingest through the API until a search from inside a run
answers: the run is started as soon as the last batch is stored, and its
first search (which brings the worker's replica up to the head) ends the
ingest figure; that first search is also shown alone. On this one host the
API applies each batch to the host's replica as it stores it, so the
worker's first search reads that replica; a worker on another host would
replay the log from the latest snapshot instead (docs/datastores.md).

The same run then times, with ``time.perf_counter`` around each ctx call
(the worker round trip included), keyword searches in two mixes ("distinctive
words": the 100 most common words left out; "words drawn from record text
as is": often words in most records), vector top-10 searches, hybrid
top-10 searches (the as-is words with a vector) and gets by id; it returns
the vector results, and recall@10 is computed here against exact
brute-force cosine over the same vectors. The worker's memory is read
after the run; CPU-seconds are read from the processes' counters. Nothing
here is a test: the numbers vary with the machine; the issue's targets are
printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowpool.cli.datastores import DEFAULT_BATCH_MB, DEFAULT_BATCH_RECORDS, JSONL, batches  # noqa: E402
from flowpool.devstack import Stack  # noqa: E402
from flowpool.redis_server import RedisServer  # noqa: E402

DIMS = 384
VOCABULARY = 50_000
WORDS_PER_RECORD = 200
CLUSTERS = 256
ZIPF_EXPONENT = 1.07
COMMON = 100  # the most frequent words, left out of keyword queries as a search box's stop words would be

TIMED = """\
import time

TIMEOUT_SECONDS = 600
CACHE_TTL_SECONDS = 0


def timed(call):
    start = time.perf_counter()
    value = call()
    return (time.perf_counter() - start) * 1000, value


def execute(ctx):
    store, args = ctx.input["store"], ctx.input
    # The first search brings the worker's replica up to the head: the end of the ingest figure.
    first_ms, _ = timed(lambda: ctx.datastore.search(store, query="zzzz", limit=1))
    searchable_at = time.time()
    assert ctx.datastore.get(store, args["last_id"]) is not None, args["last_id"]
    ctx.datastore.search(store, vector=args["vectors"][0], limit=10)
    keyword, vector, get, found = {}, [], [], []
    for mix, queries in args["queries"].items():
        keyword[mix] = [timed(lambda: ctx.datastore.search(store, query=query, limit=10))[0] for query in queries]
    for query in args["vectors"]:
        ms, hits = timed(lambda: ctx.datastore.search(store, vector=query, limit=10))
        vector.append(ms)
        found.append([hit["id"] for hit in hits])
    # Hybrid: both halves ask for 100 candidates, and the keyword half often falls back to its full query.
    hybrid = [timed(lambda: ctx.datastore.search(store, query=query, vector=vector, limit=10))[0]
              for query, vector in zip(args["queries"]["as_is"], args["vectors"])]
    for record_id in args["ids"]:
        ms, record = timed(lambda: ctx.datastore.get(store, record_id))
        assert record is not None, record_id
        get.append(ms)
    return {"keyword_ms": keyword, "vector_ms": vector, "hybrid_ms": hybrid, "get_ms": get, "vector_ids": found,
            "first_search_ms": first_ms, "searchable_at": searchable_at}
"""


class Corpus:
    """The generated data, reproducible from a seed: a Zipf vocabulary and cluster centres for the vectors."""

    def __init__(self, seed: int = 13) -> None:
        self.rng = np.random.default_rng(seed)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        lengths = self.rng.integers(3, 10, size=VOCABULARY)
        words = {"".join(self.rng.choice(letters, size=n)) for n in lengths}
        self.vocabulary = np.array(sorted(words, key=lambda w: (len(w), w)))
        weights = 1.0 / np.arange(1, len(self.vocabulary) + 1) ** ZIPF_EXPONENT
        self.cumulative = np.cumsum(weights / weights.sum())
        self.centres = self.rng.normal(size=(CLUSTERS, DIMS)).astype(np.float32)

    def words(self, shape: tuple[int, ...]) -> np.ndarray:
        ranks = np.searchsorted(self.cumulative, self.rng.random(shape))
        return np.minimum(ranks, len(self.vocabulary) - 1)

    def vectors(self, n: int) -> np.ndarray:
        """``n`` unit vectors, each near one of the cluster centres, rounded as they travel in JSON."""
        centres = self.centres[self.rng.integers(0, CLUSTERS, size=n)]
        vectors = centres + 0.6 * self.rng.normal(size=(n, DIMS)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.round(vectors, 4)

    def records(self, n: int, chunk: int = 5000) -> Iterator[tuple[str, str, np.ndarray]]:
        """``(id, text, vector)`` of ``n`` records."""
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            ranks = self.words((size, WORDS_PER_RECORD))
            vectors = self.vectors(size)
            for i in range(size):
                yield f"r{start + i}", " ".join(self.vocabulary[ranks[i]]), vectors[i]


def write_batches(corpus: Corpus, n: int, folder: Path) -> tuple[list[Path], np.ndarray]:
    """The records as JSONL batch files sized as the CLI sizes them, and their vectors as one matrix."""
    matrix = np.empty((n, DIMS), dtype=np.float32)

    def rows() -> Iterator[tuple[int, bytes, int]]:
        for index, (rid, text, vector) in enumerate(corpus.records(n)):
            matrix[index] = vector
            line = json.dumps({"id": rid, "text": text, "group": f"g{index % 10}",
                               "vec": [round(float(x), 4) for x in vector]}).encode() + b"\n"
            yield index + 1, line, len(line)

    paths = []
    for number, batch in enumerate(batches(JSONL, b"", rows(), int(DEFAULT_BATCH_MB * (1 << 20)),
                                           DEFAULT_BATCH_RECORDS)):
        path = folder / f"batch-{number:05d}.jsonl"
        path.write_bytes(batch.body)
        paths.append(path)
    return paths, matrix


def brute_force_top10(queries: np.ndarray, matrix: np.ndarray, chunk: int = 16) -> Iterator[list[str]]:
    """The ids of each query's exact cosine top 10 (the vectors are unit length), a few queries at a time."""
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk].astype(np.float32) @ matrix.T
        for row in np.argpartition(-scores, 10, axis=1)[:, :10]:
            yield [f"r{i}" for i in row]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def send(session: requests.Session, api: str, name: str, paths: list[Path]) -> None:
    """Every batch through the API, one request each (each returns once its batch is stored)."""
    for number, path in enumerate(paths, 1):
        response = session.post(f"{api}/api/v1/datastores/{name}/records", data=path.read_bytes(),
                                 headers={"Content-Type": JSONL}, timeout=600)
        response.raise_for_status()
        print(f"\r  batch {number}/{len(paths)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def queries(corpus: Corpus, count: int, rng: np.random.Generator, distinctive: bool) -> list[str]:
    """Two-word queries drawn from record-like text: past the most common words, or as they come."""
    out = []
    for ranks in corpus.words((count, WORDS_PER_RECORD)):
        words = corpus.vocabulary[ranks[ranks >= COMMON] if distinctive else ranks]
        out.append(" ".join(rng.choice(words, size=2, replace=False)))
    return out


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU-seconds of these processes and their live children, and of children they waited for."""
    total = 0.0
    for process in processes:
        try:
            members = [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
        for member in members:
            try:
                times = member.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system + times.children_user + times.children_system
    return total


def memory(process: psutil.Process) -> tuple[float, float]:
    """MB resident of a process and its children (sandboxed runs, the zygote): RSS and unique (USS)."""
    rss = uss = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            info = member.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        uss += info.uss
    return rss / 2**20, uss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="records to ingest (the issue reports 1M too)")
    parser.add_argument("--calls", type=int, default=300, help="timed ctx calls of each kind in the run")
    parser.add_argument("--keep", type=Path, default=None, help="generate batches here and keep them for a rerun")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flowpool-dsbench-"))
    batch_dir = args.keep or work / "batches"
    batch_dir.mkdir(parents=True, exist_ok=True)
    corpus = Corpus()
    print(f"generating {args.records} records into {batch_dir}...", file=sys.stderr)
    started = time.perf_counter()
    paths, matrix = write_batches(corpus, args.records, batch_dir)
    size = sum(p.stat().st_size for p in paths)
    print(f"  {len(paths)} batches, {size / 2**20:.0f} MB of JSONL, in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)

    redis_server = RedisServer().start()
    stack = Stack(env={"FLOWPOOL_LOG_LEVEL": "WARNING", "FLOWPOOL_CACHE_DIR": str(work / "cache"),
                       "FLOWPOOL_MAX_INPUT_BYTES": str(8 << 20), "FLOWPOOL_MAX_BODY_BYTES": str(16 << 20)},
                  redis_url=redis_server.url)
    try:
        worker = psutil.Process(stack.start_worker(quiet=True).pid)
        api = stack.start_api(quiet=True)
        stack.wait_ready()
        api_process, redis_process = psutil.Process(stack.processes[1].pid), psutil.Process(redis_server.process.pid)
        session = requests.Session()
        session.headers["x-api-key"] = stack.create_account("bench")
        name = "bench"
        session.post(f"{api}/api/v1/datastores", json={
            "name": name, "id_field": "id", "text_fields": ["text"], "vector_field": "vec", "vector_dims": DIMS,
            "filters": ["group"]}).raise_for_status()
        rng = np.random.default_rng(99)
        mixes = {"distinctive": queries(corpus, args.calls, rng, True),
                 "as_is": queries(corpus, args.calls, rng, False)}
        vectors = corpus.vectors(args.calls)
        ids = [f"r{i}" for i in rng.integers(0, args.records, size=args.calls)]
        session.post(f"{api}/api/v1/workflows/upload",
                     json={"workflow_ref_name": "timed", "script": TIMED}).raise_for_status()

        print("ingesting...", file=sys.stderr)
        cpu_before = cpu_seconds([api_process, redis_process])
        started_wall, started = time.time(), time.perf_counter()
        send(session, api, name, paths)
        sent = time.perf_counter() - started
        ingest_cpu = cpu_seconds([api_process, redis_process]) - cpu_before
        print("timing from inside a run...", file=sys.stderr)
        worker_cpu = cpu_seconds([worker])
        response = session.post(f"{api}/workflow/chat/completions", timeout=900, json={
            "model": "workflow:timed", "input": {"store": name, "queries": mixes, "vectors": vectors.tolist(),
                                                 "ids": ids, "last_id": f"r{args.records - 1}"}})
        response.raise_for_status()
        out = response.json()["output"]
        worker_cpu = cpu_seconds([worker]) - worker_cpu
        searchable = out["searchable_at"] - started_wall
        worker_rss, worker_uss = memory(worker)
        api_rss, _ = memory(api_process)

        recall = statistics.mean(len(set(exact) & set(found)) / 10
                                 for exact, found in zip(brute_force_top10(vectors, matrix), out["vector_ids"]))
        print(f"\ndatastore bench: {args.records} records ({size / 2**20:.0f} MB JSONL, {len(paths)} requests), "
              f"{args.calls} calls per row, {os.cpu_count()} CPUs")
        rows = [("ingest: all batches stored (s)", f"{sent:.1f}", "", ""),
                ("ingest: until a run's first search answers (s)", f"{searchable:.1f}", "", "< 60 s for 100k"),
                ("  of which that first search (ms)", f"{out['first_search_ms']:.0f}", "", ""),
                ("ingest CPU-seconds, API + Redis", f"{ingest_cpu:.1f}", "", "")]
        for samples, title, target in (
                (out["keyword_ms"]["distinctive"], "keyword top-10, distinctive words", "p50 < 20 ms"),
                (out["keyword_ms"]["as_is"], "keyword top-10, words drawn from record text as is", "p50 < 20 ms"),
                (out["vector_ms"], "vector top-10", "p50 < 20 ms"),
                (out["hybrid_ms"], "hybrid top-10, words as is + a vector", ""),
                (out["get_ms"], "get by id", "p50 < 2 ms")):
            rows.append((f"{title} (ms, ctx round trip)", f"{statistics.median(samples):.3f}",
                         f"{percentile(samples, 99):.3f}", target))
        rows += [("vector recall@10 vs exact brute force", f"{recall:.3f}", "", ">= 0.95"),
                 ("worker memory, RSS / USS (MB, with its runs)", f"{worker_rss:.0f}", f"{worker_uss:.0f}", ""),
                 ("worker CPU-seconds for the run", f"{worker_cpu:.1f}", "", ""),
                 ("API process memory, RSS (MB)", f"{api_rss:.0f}", "", "")]
        print(f"{'records':<72} {args.records:>9}")
        print(f"{'row':<72} {'p50/value':>9} {'p99':>9}  target")
        for title, value, p99, target in rows:
            print(f"{title:<72} {value:>9} {p99:>9}  {target}")
    finally:
        stack.stop()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
