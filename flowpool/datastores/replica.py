"""A host's local replica of one datastore incarnation: SQLite (WAL, FTS5) plus a float32 vector file.

Files, under ``<cache>/datastores/<account>/<name>/<generation>/<FORMAT>/`` (FORMAT names the layout below:
code that writes another layout uses another directory, and snapshots of another layout are not read):

- ``replica.sqlite3``: ``records`` (rid, id, the record as JSON without its
  vector, its vector row and norm), ``fts`` (a contentless FTS5 index of the
  text fields, rowid = rid, ranked with bm25; ``fts_vocab`` reads its
  words' document counts), ``filters`` (field, canonical
  JSON value, rid) for equality filters, ``dead`` (vector rows replaced or
  deleted, by the batch that did it), ``log`` (the blob name of each batch
  applied, by seq) and ``meta`` (``applied``: the last batch applied;
  ``vrows``: rows in the vector file; ``vbase``: rows below it are all dead;
  ``epoch``: bumped by a reset; ``indexed``: records in ``fts``, bm25's N).
- ``vectors.f32``: append-only rows of float32 vectors as ingested, read
  through ``numpy.memmap``; every process of the host shares its pages
  through the page cache (each process keeps 1/norm per row beside it). A replaced vector gets a new row; the old one is
  marked dead, so a row is never written twice and a reader never sees one
  half-written.
- ``lock``: ``flock``-ed by the one process of the host applying batches.

A batch applies in one SQLite transaction that also moves ``applied`` and
``vrows``; its vectors are appended before the commit. A process that dies
mid-apply leaves a rolled-back transaction and perhaps vector rows past
``vrows``, which the next applier cuts off before it goes on, so a crash
never leaves a replica half-applied.

A replica whose log is not Redis's (Redis restarted and lost its last
writes: its head went back, or another batch took a seq this replica had
applied) is reset in place: its tables emptied and its vector rows all made
dead (the file is never cut under the processes mapping it), then replayed.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from flowpool.errors import DatastoreCatchingUp, Unavailable

from .batch import decode_batch
from .spec import Batch, Spec, filter_values

__all__ = ["FORMAT", "Replica", "State"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('applied', 0), ('vrows', 0), ('vbase', 0), ('epoch', 0), ('indexed', 0);
CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, blob TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (rid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, body TEXT NOT NULL,
                                    vrow INTEGER);
CREATE INDEX IF NOT EXISTS records_vrow ON records (vrow) WHERE vrow IS NOT NULL;
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5 (text, content='', tokenize='unicode61');
CREATE VIRTUAL TABLE IF NOT EXISTS fts_vocab USING fts5vocab (fts, row);
CREATE TABLE IF NOT EXISTS filters (field TEXT NOT NULL, value TEXT NOT NULL, rid INTEGER NOT NULL,
                                    PRIMARY KEY (field, value, rid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS filters_rid ON filters (rid);
CREATE TABLE IF NOT EXISTS dead (vrow INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS dead_seq ON dead (seq);
"""

# The layout of a replica's files (tables, meta keys, vector file): a change to it changes this name.
FORMAT = "r1"
# The blob names of the store's batches after a seq, to the end of the log as Redis has it when called (the
# second argument, the head the caller read, is how many it expects at least).
Log = Callable[[int, int], list[str]]
# The bytes of a batch blob.
Get = Callable[[str], bytes]
# Writes the latest snapshot's two files at (database, vector file) and says True, or False without one.
Seed = Callable[[Path, Path], bool]
# Rows per chunk when computing vector norms (a temporary of this many rows, not of the whole matrix).
_NORM_CHUNK = 65536


@dataclass(frozen=True)
class State:
    """What readers of this process see: taken whole, so one search never mixes two states."""

    applied: int
    tail: str | None              # the blob name of batch ``applied``
    vectors: np.ndarray | None   # (rows, dims) float32 memmap, or None without vectors
    live: np.ndarray              # bool per vector row: False where replaced or deleted
    inv_norms: np.ndarray         # float32 1/norm per vector row (0 for a zero vector)


class Replica:
    """One store incarnation's local copy; shared by the threads of a process, safe between processes."""

    def __init__(self, directory: Path, spec: Spec, apply_wait_seconds: float = 120.0,
                 seed: Seed | None = None) -> None:
        """``seed(db_path, vector_path)``: called once when the host has no replica yet; writes a snapshot's two
        files there and says True, or False when there is no snapshot to start from. Opening takes as long as
        that download (a run's read waits for it only up to its deadline: Datastores._open)."""
        self.dir = directory
        self.spec = spec
        self.dims = spec.vector_dims or 0
        self.apply_wait_seconds = apply_wait_seconds
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / "replica.sqlite3"
        self.vector_path = self.dir / "vectors.f32"
        self._apply_lock = threading.Lock()
        self._pool: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._closed = False
        self._dead_seen = 0
        self._epoch: int | None = None
        self.state = State(0, None, None, np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float32))
        with self._host_lock():
            if seed is not None and not self.db_path.exists():
                self._seed(seed)
            with contextlib.closing(self._open()) as conn:
                conn.executescript(_SCHEMA)
        self._load_state()

    def _seed(self, seed: Seed) -> None:
        """Start from a snapshot: both files downloaded beside their places, then renamed (the database last)."""
        tmp_db, tmp_vectors = self.dir / ".seed.sqlite3", self.dir / ".seed.f32"
        try:
            if seed(tmp_db, tmp_vectors):
                os.replace(tmp_vectors, self.vector_path)
                os.replace(tmp_db, self.db_path)
        finally:
            tmp_db.unlink(missing_ok=True)
            tmp_vectors.unlink(missing_ok=True)

    # -- connections -------------------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=60)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A connection from the pool (threads and greenlets take turns; none is shared at once)."""
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = self._open()
        try:
            yield conn
        finally:
            with self._pool_lock:
                if len(self._pool) < 16 and not self._closed:
                    self._pool.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def close(self) -> None:
        """Close the pooled connections; one a thread still reads with closes when it comes back."""
        with self._pool_lock:
            pool, self._pool, self._closed = self._pool, [], True
        for conn in pool:
            conn.close()

    @contextlib.contextmanager
    def _host_lock(self, deadline: float | None = None, head: int | None = None) -> Iterator[None]:
        """The host-wide apply lock (flock), waited for without blocking an event loop: at most
        ``apply_wait_seconds`` (then a 503), and not past the caller's ``deadline``."""
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        give_up = time.monotonic() + self.apply_wait_seconds
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        raise DatastoreCatchingUp(self.spec.name, self.state.applied, head) from None
                    if now > give_up:
                        raise Unavailable("another process of this host is still bringing the datastore "
                                          "replica up to date; try again") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the flock

    # -- catching up -------------------------------------------------------------------------------------------

    def catch_up(self, head: int, tail: str | None, batches: Log, get: Get,
                 reread: Callable[[], tuple[int, str | None]] | None = None, deadline: float | None = None) -> None:
        """Bring the replica up to ``head`` at least (no-op when it is there).

        ``tail``: the blob name of batch ``head`` as Redis has it (None: not known). A replica whose batch at its
        own seq is not the log's, or past the log's end, is reset and replayed (see the module's docstring).
        ``reread()``: the log's (head, tail) now, read when this process is past ``head``.
        ``deadline`` (monotonic, or None): waiting for the locks stops there, and applying stops at the first
        batch boundary past it; either raises :class:`DatastoreCatchingUp`. The batches applied stay committed,
        so the next call goes on from there.
        """
        state = self.state
        if self._current(state.applied, state.tail, head, tail):
            return
        if state.applied > head and reread is not None:
            # Past the head the caller read: mostly a write this process applied after that read (concurrent
            # ingests), with nothing to do; but also what a Redis that lost batches looks like. The head now tells
            # them apart without the locks: at this replica's seq and batch, it is the log's.
            head, tail = reread()
            if self._current(state.applied, state.tail, head, tail):
                return
        if not self._apply_lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            # another thread of this process is applying, past our deadline
            raise DatastoreCatchingUp(self.spec.name, self.state.applied, head)
        try:
            with self.reader() as conn:
                applied, applied_tail = _meta(conn)["applied"], _tail(conn)
            stopped = None
            if not self._current(applied, applied_tail, head, tail):
                with self._host_lock(deadline, head), contextlib.closing(self._open()) as conn:
                    stopped = self._bring_up(conn, head, batches, get, deadline)
            self._load_state()  # the batches applied before a deadline stopped us too: readers see them
        finally:
            self._apply_lock.release()
        if stopped is not None:
            raise DatastoreCatchingUp(self.spec.name, stopped, head)

    @staticmethod
    def _current(applied: int, applied_tail: str | None, head: int, tail: str | None) -> bool:
        return applied == head and (tail is None or applied_tail == tail)

    def _bring_up(self, conn: sqlite3.Connection, head: int, batches: Log, get: Get,
                  deadline: float | None = None) -> int | None:
        """Apply the log's batches after this replica's; reset it first if its last one is not the log's.

        The log is read after the applied seq (under the host lock, so no other process moves it): a replica
        past the log's end then means Redis lost batches, never that ``head`` was read before a newer write.
        None when every batch is applied; the seq applied when ``deadline`` passed with batches left.
        """
        applied = self._recover(conn)
        names = batches(max(applied - 1, 0), head)  # from the batch at ``applied``: is it still the log's?
        if applied and (not names or names[0] != _tail(conn)):
            if deadline is not None and time.monotonic() >= deadline:
                return applied  # a replay from the start is for a read with time left (it serves nothing now)
            log.warning("datastore replica %s applied a batch %d that the log in Redis does not hold (it has %d): "
                        "replaying the log from the start", self.dir, applied, applied - 1 + len(names))
            self._reset(conn)
            applied, names = 0, batches(0, head)
        elif applied:
            names = names[1:]
        for seq, name in enumerate(names, start=applied + 1):
            if deadline is not None and time.monotonic() >= deadline:
                return seq - 1
            self._apply(conn, seq, name, decode_batch(get(name)))
        return None

    def _recover(self, conn: sqlite3.Connection) -> int:
        """Cut off vector rows a crashed apply appended past its last commit; the applied seq."""
        meta = _meta(conn)
        expected = meta["vrows"] * self.dims * 4
        size = self.vector_path.stat().st_size if self.vector_path.exists() else 0
        if size > expected:
            os.truncate(self.vector_path, expected)
        elif size < expected:
            raise RuntimeError(f"datastore replica {self.dir} lost vector rows; remove it to rebuild it")
        return meta["applied"]

    def _reset(self, conn: sqlite3.Connection) -> None:
        """Forget every batch applied. The vector rows stay in the file (other processes map them, and a row is
        never rewritten) but all become dead (``vbase``); ``epoch`` tells every process to rebuild what it derived."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT INTO fts (fts) VALUES ('delete-all')")
            for table in ("records", "filters", "dead", "log"):
                conn.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
            conn.execute("UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'vrows') WHERE key = 'vbase'")
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'epoch'")
            conn.execute("UPDATE meta SET value = 0 WHERE key IN ('applied', 'indexed')")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _apply(self, conn: sqlite3.Connection, seq: int, blob: str, batch: Batch) -> None:
        """Apply one batch in one transaction (its vectors appended first, then the commit)."""
        spec = self.spec
        conn.execute("BEGIN IMMEDIATE")
        try:
            vrows = conn.execute("SELECT value FROM meta WHERE key = 'vrows'").fetchone()[0]
            indexed = 0  # records this batch adds to the fts index (negative: takes out)
            for rid in batch.deletes:
                indexed -= self._remove(conn, seq, rid, delete=True)[1]
            vector_of = {index: row for row, index in enumerate(batch.vector_rows)}
            new_rows = []
            for index, (record_id, record) in enumerate(batch.upserts):
                row = vector_of.get(index)
                vrow = None
                if row is not None:
                    new_rows.append(row)
                    vrow = vrows + len(new_rows) - 1
                body = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
                rid, unindexed = self._remove(conn, seq, record_id, delete=False)
                indexed -= unindexed
                if rid is None:
                    rid = conn.execute("INSERT INTO records (id, body, vrow) VALUES (?, ?, ?)",
                                       (record_id, body, vrow)).lastrowid
                else:
                    conn.execute("UPDATE records SET body = ?, vrow = ? WHERE rid = ?", (body, vrow, rid))
                text = spec.text_of(record)
                if text:
                    conn.execute("INSERT INTO fts (rowid, text) VALUES (?, ?)", (rid, text))
                    indexed += 1
                conn.executemany("INSERT OR IGNORE INTO filters VALUES (?, ?, ?)",
                                 [(name, value, rid) for name in spec.filters if name in record
                                  for value in filter_values(record[name])])
            if new_rows:
                matrix = np.ascontiguousarray(batch.vectors[new_rows], dtype="<f4")  # type: ignore[index]
                with open(self.vector_path, "ab") as out:
                    out.write(matrix.tobytes())
                vrows += len(new_rows)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'vrows'", (vrows,))
            conn.execute("UPDATE meta SET value = value + ? WHERE key = 'indexed'", (indexed,))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'applied'", (seq,))
            conn.execute("INSERT OR REPLACE INTO log VALUES (?, ?)", (seq, blob))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _remove(self, conn: sqlite3.Connection, seq: int, record_id: str, delete: bool) -> tuple[int | None, bool]:
        """Take a record out of the indexes (and out of ``records`` when ``delete``): its rid (None if absent), and
        whether it was in the fts index."""
        row = conn.execute("SELECT rid, body, vrow FROM records WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            return None, False
        rid, body, vrow = row
        text = self.spec.text_of(json.loads(body))
        if text:
            conn.execute("INSERT INTO fts (fts, rowid, text) VALUES ('delete', ?, ?)", (rid, text))
        conn.execute("DELETE FROM filters WHERE rid = ?", (rid,))
        if vrow is not None:
            conn.execute("INSERT OR REPLACE INTO dead VALUES (?, ?)", (vrow, seq))
        if delete:
            conn.execute("DELETE FROM records WHERE rid = ?", (rid,))
        return rid, bool(text)

    def _load_state(self) -> None:
        """Publish what the database holds now to this process's readers (dead rows read incrementally)."""
        with self.reader() as conn:
            conn.execute("BEGIN")
            try:
                meta = _meta(conn)
                if meta["epoch"] != self._epoch:  # a reset (or the first load): the dead rows all again
                    self._dead_seen = 0
                dead = conn.execute("SELECT vrow, seq FROM dead WHERE seq > ?", (self._dead_seen,)).fetchall()
                tail = _tail(conn)
            finally:
                conn.execute("COMMIT")
        applied, vrows = meta["applied"], meta["vrows"]
        old = self.state
        live = old.live
        if meta["epoch"] != self._epoch:
            self._epoch = meta["epoch"]
            live = np.ones(vrows, dtype=bool)
            live[:meta["vbase"]] = False
        elif len(live) != vrows:
            live = np.ones(vrows, dtype=bool)
            live[:len(old.live)] = old.live[:vrows]
        else:
            live = live.copy()
        for vrow, seq in dead:
            if vrow < vrows:
                live[vrow] = False
            self._dead_seen = max(self._dead_seen, seq)
        vectors, inv_norms = None, old.inv_norms
        if self.dims and vrows:
            vectors = np.memmap(self.vector_path, dtype="<f4", mode="r", shape=(vrows, self.dims))
            known = min(len(inv_norms), vrows)
            inv_norms = np.concatenate([inv_norms[:known], _inverse_norms(vectors[known:])])
        self.state = State(applied, tail, vectors, live, inv_norms)

    # -- snapshots ---------------------------------------------------------------------------------------------

    def export(self, target: Path) -> tuple[int, Path, Path]:
        """A consistent copy of the replica in ``target``: (applied seq, database file, vector file).

        No lock: ``VACUUM INTO`` copies one read transaction, and the vector rows it counts were in the file
        before it committed and are never rewritten. Its own connection, not the pool's: a snapshot runs on an OS
        thread even under gevent (flowpool.datastores.snapshots), where the pool's lock is a greenlet's.
        """
        target.mkdir(parents=True, exist_ok=True)
        db, vectors = target / "replica.sqlite3", target / "vectors.f32"
        with contextlib.closing(self._open()) as conn:
            db.unlink(missing_ok=True)
            conn.execute("VACUUM INTO ?", (str(db),))
            with contextlib.closing(sqlite3.connect(db)) as copy:
                meta = _meta(copy)
            applied, vrows = meta["applied"], meta["vrows"]
            with open(vectors, "wb") as out:
                if vrows and self.dims:
                    with open(self.vector_path, "rb") as src:
                        shutil.copyfileobj(_limited(src, vrows * self.dims * 4), out)
        return applied, db, vectors


def _meta(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def _tail(conn: sqlite3.Connection) -> str | None:
    """The blob name of the last batch applied (None when none is)."""
    row = conn.execute("SELECT blob FROM log WHERE seq = (SELECT value FROM meta WHERE key = 'applied')").fetchone()
    return row[0] if row else None


def _inverse_norms(rows: np.ndarray) -> np.ndarray:
    """1/norm of each row, 0 for a zero row (its cosine with anything is then 0); in chunks of rows, so the
    temporaries stay small however large the matrix."""
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), _NORM_CHUNK):
        chunk = np.asarray(rows[start:start + _NORM_CHUNK], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        with np.errstate(divide="ignore"):
            out[start:start + len(chunk)] = np.where(norms > 0, 1.0 / norms, 0.0)
    return out


def _limited(src, size: int):  # type: ignore[no-untyped-def]
    """A file-like over the first ``size`` bytes of ``src``."""
    class _Reader:
        remaining = size

        def read(self, n: int = -1) -> bytes:
            n = self.remaining if n < 0 else min(n, self.remaining)
            data = src.read(n)
            self.remaining -= len(data)
            return data
    return _Reader()
