"""The datastore engine every process uses: the API (create, ingest, search) and the workers (ctx.datastore).

Writes go to the store's log: a request is checked whole, written as one
blob, then appended to the manifest with a compare-and-set on its head
(flowpool.datastores.manifest). Reads go to this host's replica, brought up
to the head first: one HMGET per read when nothing changed, the missing
batches applied when something did (flowpool.datastores.replica). So every
process on every host sees a write on its next read, and none reads a store
half-written.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import random
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from flowpool.blobs import BlobNotFound, BlobStore
from flowpool.errors import DatastoreCatchingUp, DatastoreNotFound, RequestError, Unavailable, UpstreamError

from .batch import encode_batch
from .manifest import Manifest, Manifests, StaleHead
from .replica import FORMAT, Replica
from .search import check_filters, get_record, keyword_hits, records_of, rrf, vector_hits
from .snapshots import Snapshots
from .spec import Batch, check_ids, check_spec, check_vector, prepare_upserts

if TYPE_CHECKING:
    import redis

    from flowpool.settings import Settings

__all__ = ["Datastores", "Embedder"]

log = logging.getLogger(__name__)

Embedder = Callable[[dict, list[str]], list[list[float]]]
# The most results one search returns (the API's, the CLI's and ctx's limit alike).
MAX_SEARCH_LIMIT = 1000


class Datastores:
    """Every account's datastores, as one process reads and writes them; safe to share between threads."""

    def __init__(self, client: redis.Redis, blobs: BlobStore, settings: Settings,
                 embedder: Embedder | None = None) -> None:
        self.manifests = Manifests(client)
        self.blobs = blobs
        self.settings = settings
        self.embedder = embedder
        self.root = Path(settings.cache_path) / "datastores"
        self.snapshots = Snapshots(blobs, self.manifests, settings.datastore_snapshot_batches)
        self._replicas: dict[tuple[str, str], tuple[Replica, Manifest]] = {}
        self._lock = threading.Lock()  # guards the two dicts only: never held while a replica opens
        self._opening: dict[tuple[str, str], threading.Lock] = {}
        # Opens under way for runs' reads, by (account, name, generation): see _open.
        self._pending: dict[tuple[str, str, str], concurrent.futures.Future] = {}

    # -- stores ------------------------------------------------------------------------------------------------

    def create(self, account_id: str, spec: dict) -> dict:
        """Create a store; 400 for a bad spec, 409 if the account has one of that name."""
        return self.manifests.create(account_id, check_spec(spec), uuid.uuid4().hex[:16]).view()

    def list(self, account_id: str) -> list[dict]:
        views = []
        for name in self.manifests.names(account_id):
            try:
                views.append(self.manifests.read(account_id, name).view())
            except DatastoreNotFound:
                continue  # deleted meanwhile
        return views

    def get(self, account_id: str, name: str) -> dict:
        return self.manifests.read(account_id, name).view()

    def delete(self, account_id: str, name: str) -> None:
        """Drop the store: its manifest first (readers see a 404 at once), then its blobs and this host's replica.

        Once the manifest is gone the store is deleted, whatever follows: blobs the blob store fails to remove are
        logged (their names start with the incarnation's prefix, which nothing names again), not a failed delete.
        """
        manifest = self.manifests.read(account_id, name)
        if not self.manifests.drop(manifest):
            raise DatastoreNotFound(name)
        try:
            self.blobs.delete_prefix(manifest.prefix)
        except Exception:  # noqa: BLE001 - the store is deleted; a retry would be a 404
            log.exception("datastore %s of account %s is deleted, but removing its blobs under %s failed",
                          name, account_id, manifest.prefix)
        key = (account_id, name)
        with self._lock:
            entry = self._replicas.get(key)
            if entry is not None and entry[1].generation == manifest.generation:
                del self._replicas[key]
            else:
                entry = None  # not this process's, or already a newer incarnation's
        if entry is not None:
            entry[0].close()
        shutil.rmtree(self._directory(manifest), ignore_errors=True)

    # -- writes ------------------------------------------------------------------------------------------------

    def ingest(self, account_id: str, name: str, records: list[dict]) -> dict:
        """Upsert ``records`` by id as one batch: all of them or, on any 400, none."""
        manifest = self.manifests.read(account_id, name)
        settings = self.settings
        batch = prepare_upserts(manifest.spec, records, settings.datastore_batch_max_records,
                                settings.datastore_record_max_bytes)
        if not batch.upserts:
            return {"upserted": 0, "version": manifest.head}  # nothing to write: no batch, no new version
        self._embed_missing(manifest, batch)
        ids = [rid for rid, _ in batch.upserts]
        seq = self._append(manifest, batch, lambda replica: len(ids) - _count_existing(replica, ids))
        return {"upserted": len(ids), "version": seq}

    def delete_records(self, account_id: str, name: str, ids: list[str]) -> dict:
        """Delete these records (ids not stored are skipped) as one batch."""
        manifest = self.manifests.read(account_id, name)
        batch = Batch(deletes=check_ids(ids))
        if len(batch.deletes) > self.settings.datastore_batch_max_records:
            raise RequestError(f"{len(batch.deletes)} ids in one request; at most "
                               f"{self.settings.datastore_batch_max_records}", param="ids")
        deleted: list[int] = []

        def delta(replica: Replica) -> int:
            deleted[:] = [_count_existing(replica, batch.deletes)]
            return -deleted[0]
        seq = self._append(manifest, batch, delta, skip_if_zero=True)
        return {"deleted": deleted[0] if deleted else 0, "version": seq}

    def _append(self, manifest: Manifest, batch: Batch, delta: Callable[[Replica], int],
                skip_if_zero: bool = False) -> int:
        """Store ``batch`` as one blob and make it the next batch of the log; the new head.

        ``delta(replica)``, read from this host's replica at the head the batch goes after, is how many records
        the store gains, so the manifest's count stays exact with concurrent writers (a lost race reads again).
        """
        blob = f"{manifest.prefix}batches/{uuid.uuid4().hex}"
        stored = False
        # A lost race is tried again after a short random pause, for as long as a reader waits for an apply:
        # a count of tries, not time, let a writer that kept losing to busy peers give up on a loaded host.
        give_up = time.monotonic() + self.settings.datastore_apply_wait_seconds
        try:
            while time.monotonic() < give_up:
                replica, current, head = self._replica_at_head(manifest.account_id, manifest.spec.name)
                if current.generation != manifest.generation:
                    raise DatastoreNotFound(manifest.spec.name)  # deleted (and perhaps created again) meanwhile
                with self._unless_gone(manifest):
                    change = delta(replica)
                if skip_if_zero and change == 0:
                    return head
                if not stored:
                    self.blobs.put(blob, encode_batch(batch, manifest.spec.vector_dims))
                    stored = True
                try:
                    seq = self.manifests.append(manifest, head, blob, change)
                except StaleHead:
                    time.sleep(random.uniform(0.001, 0.02))
                    continue
                stored = False  # it is the log's now
                self._catch_up(replica, manifest, seq, blob)
                self.snapshots.maybe_take(manifest, replica, seq)
                return seq
            raise Unavailable("the datastore is being written by many requests at once; try again")
        finally:
            if stored:
                try:
                    self.blobs.delete(blob)
                except Exception:  # noqa: BLE001 - the error that brought us here is the one to report
                    log.exception("could not remove the unappended batch %s", blob)

    def _embed_missing(self, manifest: Manifest, batch: Batch) -> None:
        """Give the records that came without a vector (and have text) one from the store's embedding endpoint."""
        spec = manifest.spec
        if not spec.embedding or self.embedder is None:
            return
        vectors = {index: batch.vectors[row] for row, index in enumerate(batch.vector_rows)}  # type: ignore[index]
        missing = [index for index, (_, record) in enumerate(batch.upserts)
                   if index not in vectors and spec.text_of(record)]
        if not missing:
            return
        answer = self.embedder(dict(spec.embedding), [spec.text_of(batch.upserts[index][1]) for index in missing])
        if len(answer) != len(missing):
            raise UpstreamError(f"the embedding endpoint answered {len(answer)} vectors for {len(missing)} texts")
        for index, vector in zip(missing, answer):
            vectors[index] = _embedded(spec, vector)
        batch.vector_rows = sorted(vectors)
        batch.vectors = np.stack([vectors[index] for index in batch.vector_rows]).astype(np.float32)

    # -- reads -------------------------------------------------------------------------------------------------

    def get_record(self, account_id: str, name: str, record_id: str, deadline: float | None = None) -> dict | None:
        """The record as ingested (its vector as stored, float32), or None.

        ``deadline`` (monotonic; a run's ctx call passes the run's, the API none): bringing this host's replica up
        to date stops there with :class:`DatastoreCatchingUp` (what was applied stays; the next read goes on).
        """
        replica, manifest, _ = self._replica_at_head(account_id, name, deadline)
        with self._unless_gone(manifest):
            return get_record(replica, str(record_id))

    def search(self, account_id: str, name: str, query: str | None = None, vector: list[float] | None = None,
               limit: int = 10, filters: dict | None = None, deadline: float | None = None) -> dict:
        """Keyword (``query``), vector (``vector``) or hybrid (both; or ``query`` on a store that embeds);
        ``deadline`` as in :meth:`get_record`."""
        replica, manifest, _ = self._replica_at_head(account_id, name, deadline)
        with self._unless_gone(manifest):
            return self._search(replica, name, query, vector, limit, filters)

    def _search(self, replica: Replica, name: str, query: str | None, vector: list[float] | None, limit: int,
                filters: dict | None) -> dict:
        spec = replica.spec
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise RequestError(f"limit must be an integer from 1 to {MAX_SEARCH_LIMIT}", param="limit")
        if query is not None and not isinstance(query, str):
            raise RequestError("query must be a string", param="query")
        checked = check_filters(spec, filters)
        if vector is not None:
            if not spec.vector_field:
                raise RequestError(f"datastore {name!r} has no vectors (no vector_field)", param="vector")
            vector = check_vector(spec, vector, "vector", param="vector")
        elif query and spec.embedding and self.embedder is not None:
            vector = _embedded(spec, self.embedder(dict(spec.embedding), [query])[0])
        if query is None and vector is None:
            raise RequestError("a search needs a query, a vector or both", param="query")
        if vector is None:
            mode, hits = "keyword", [(rid, score, None) for rid, score in keyword_hits(replica, query, limit, checked)]
        elif not query:
            mode, hits = "vector", [(rid, None, score) for rid, score in vector_hits(replica, vector, limit, checked)]
        else:
            mode, hits = "hybrid", _hybrid(replica, query, vector, limit, checked,
                                           max(limit, self.settings.datastore_hybrid_candidates))
        records = records_of(replica, [hit[0] for hit in hits])
        data = []
        for rid, keyword, cosine, *fused in hits:
            if rid in records:
                score = fused[0] if fused else (keyword if keyword is not None else cosine)
                data.append({"id": records[rid][spec.id_field], "score": score,
                             "scores": {"keyword": keyword, "vector": cosine}, "record": records[rid]})
        return {"mode": mode, "data": data}

    # -- replicas ----------------------------------------------------------------------------------------------

    def _directory(self, manifest: Manifest) -> Path:
        """The host's directory of one incarnation; its replica is in the subdirectory of the replica's FORMAT."""
        return self.root / manifest.account_id / manifest.spec.name / manifest.generation

    def _replica_at_head(self, account_id: str, name: str,
                         deadline: float | None = None) -> tuple[Replica, Manifest, int]:
        """This process's replica of the store, brought up to the head Redis has now (by ``deadline``, else
        :class:`DatastoreCatchingUp`); its manifest; that head."""
        seen = self._replicas.get((account_id, name))  # read before the head: if the head is gone, so is this one
        found = self.manifests.head(account_id, name)
        if found is None:
            if seen is not None:
                self._forget(seen)  # deleted, perhaps by another host: let go of this host's replica
            raise DatastoreNotFound(name)
        generation, head, tail = found
        entry = self._replicas.get((account_id, name))
        if entry is None or entry[1].generation != generation:
            manifest = self.manifests.read(account_id, name)  # the incarnation may have changed again: take it
            if manifest.generation != generation:
                head, tail = manifest.head, None
            with self._unless_gone(manifest):
                entry = self._open(manifest, deadline)
        replica, manifest = entry
        self._catch_up(replica, manifest, head, tail, deadline)
        return replica, manifest, head

    @contextlib.contextmanager
    def _unless_gone(self, manifest: Manifest) -> Iterator[None]:
        """A 404 for a replica's files failing under a read because the store was deleted meanwhile (its
        directory removed by delete() here, or by another process of the host); any other failure as it is."""
        try:
            yield
        except (sqlite3.DatabaseError, OSError, ValueError) as exc:
            if not self._current(manifest):
                raise DatastoreNotFound(manifest.spec.name) from exc
            raise

    def _open(self, manifest: Manifest, deadline: float | None = None) -> tuple[Replica, Manifest]:
        """This process's replica of ``manifest``'s incarnation, opened once (a snapshot download, a wait for the
        host lock) under the store's own lock: a slow first open of one store never holds up another's.

        With a ``deadline`` (a run's read) the open goes on in a thread of its own and the caller waits for it
        only until then (:class:`DatastoreCatchingUp`): a snapshot too big for one run's time is still
        downloaded once, and a later run finds the replica open.
        """
        if deadline is None:
            return self._open_now(manifest)
        key = (manifest.account_id, manifest.spec.name, manifest.generation)
        with self._lock:
            future = self._pending.get(key)
            if future is None:
                future = self._pending[key] = concurrent.futures.Future()
                try:
                    threading.Thread(target=self._open_into, args=(manifest, future), daemon=True,
                                     name=f"flowpool-datastore-open-{manifest.spec.name}").start()
                except BaseException:  # no thread (the process at its limit): the next read tries again
                    del self._pending[key]
                    raise
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise DatastoreCatchingUp(manifest.spec.name) from None

    def _open_into(self, manifest: Manifest, future: concurrent.futures.Future) -> None:
        """Open a replica for the runs waiting on ``future``. An incarnation deleted (or replaced) before or
        while it opens is not kept: nobody may be waiting any more, and its files would stay behind. Done, the
        next read opens afresh if it must (a failed open is tried again)."""
        key = (manifest.account_id, manifest.spec.name, manifest.generation)
        try:
            if not self._current(manifest):
                raise DatastoreNotFound(manifest.spec.name)
            entry = self._open_now(manifest)
            if not self._current(manifest):
                self._forget(entry)
                raise DatastoreNotFound(manifest.spec.name)
            future.set_result(entry)
        except BaseException as exc:  # handed to whoever still waits; logged, since perhaps nobody does
            if not isinstance(exc, DatastoreNotFound):
                log.warning("opening the replica of datastore %s of account %s failed", manifest.spec.name,
                            manifest.account_id, exc_info=True)
            future.set_exception(exc)
        finally:
            with self._lock:
                if self._pending.get(key) is future:
                    del self._pending[key]

    def _current(self, manifest: Manifest) -> bool:
        """Whether Redis still names ``manifest``'s incarnation of its store."""
        found = self.manifests.head(manifest.account_id, manifest.spec.name)
        return found is not None and found[0] == manifest.generation

    def _open_now(self, manifest: Manifest) -> tuple[Replica, Manifest]:
        key = (manifest.account_id, manifest.spec.name)
        with self._lock:
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:
            entry = self._replicas.get(key)
            if entry is not None and entry[1].generation == manifest.generation:
                return entry
            replica = Replica(self._directory(manifest) / FORMAT, manifest.spec,
                              self.settings.datastore_apply_wait_seconds, seed=self.snapshots.seeder(manifest))
            entry = (replica, manifest)
            with self._lock:
                old, self._replicas[key] = self._replicas.get(key), entry
        if old is not None:
            self._retire(old)
        return entry  # the very entry kept: _forget lets go of it by identity

    def _forget(self, entry: tuple[Replica, Manifest]) -> None:
        """Let go of this process's replica of an incarnation seen deleted; only that entry (under the lock, a
        thread that saw the old incarnation gone never drops the entry of one created again meanwhile)."""
        manifest = entry[1]
        key = (manifest.account_id, manifest.spec.name)
        with self._lock:
            if self._replicas.get(key) is not entry:
                return
            del self._replicas[key]
        self._retire(entry)

    def _retire(self, entry: tuple[Replica, Manifest]) -> None:
        """Close a replica this process no longer reads; remove the host's copy only if its incarnation is gone
        from Redis (the directory is shared by the host's processes, and generations never come back)."""
        replica, manifest = entry
        replica.close()
        if not self._current(manifest):
            shutil.rmtree(self._directory(manifest), ignore_errors=True)

    def _catch_up(self, replica: Replica, manifest: Manifest, head: int, tail: str | None,
                  deadline: float | None = None) -> None:
        def reread() -> tuple[int, str | None]:
            found = self.manifests.head(manifest.account_id, manifest.spec.name)
            if found is None or found[0] != manifest.generation:
                raise DatastoreNotFound(manifest.spec.name)
            return found[1], found[2]
        try:
            with self._unless_gone(manifest):
                replica.catch_up(head, tail, lambda after, upto: self._batches(manifest, after, upto),
                                 self.blobs.get, reread, deadline)
        except BlobNotFound as exc:
            if not self._current(manifest):
                raise DatastoreNotFound(manifest.spec.name) from exc  # deleted while we read it
            raise

    def _batches(self, manifest: Manifest, after: int, head: int) -> list[str]:
        """The blob names of the batches after ``after``, to the end of the log now (read after the replica's
        applied seq was, so a log shorter than that seq is one Redis lost, not a stale read)."""
        names = self.manifests.batches(manifest.account_id, manifest.spec.name, manifest.generation, after)
        if len(names) < head - after and not self._current(manifest):
            raise DatastoreNotFound(manifest.spec.name)  # its log went with it
        return names


def _embedded(spec: Any, vector: Any) -> np.ndarray:
    try:
        return check_vector(spec, list(vector), "the embedding endpoint's answer")
    except RequestError as exc:
        raise UpstreamError(exc.message) from exc


def _count_existing(replica: Replica, ids: list[str]) -> int:
    count = 0
    with replica.reader() as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            count += conn.execute(f"SELECT count(*) FROM records WHERE id IN ({marks})", chunk).fetchone()[0]
    return count


def _hybrid(replica: Replica, query: str, vector: np.ndarray, limit: int, filters: list,
            candidates: int) -> list[tuple[int, float | None, float | None, float]]:
    keyword = keyword_hits(replica, query, candidates, filters)
    nearest = vector_hits(replica, vector, candidates, filters)
    by_keyword, by_vector = dict(keyword), dict(nearest)
    return [(rid, by_keyword.get(rid), by_vector.get(rid), score) for rid, score in rrf([keyword, nearest])[:limit]]
