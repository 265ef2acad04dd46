"""Snapshots of a replica in the blob store, so a new host replays only the batches after the latest one.

Every FLOWPOOL_DATASTORE_SNAPSHOT_BATCHES batches, the process that wrote
the batch (its replica is at that head) copies its replica (SQLite ``VACUUM
INTO`` and the vector file cut at its committed rows) into
``datastores/<account>/<name>/<generation>/snapshots/<seq>/<FORMAT>/`` on a
background thread, then records ``seq`` in the manifest (only ever forward)
and removes the snapshot before it. A host with no replica of the store
downloads the latest snapshot and applies the batches after ``seq``. A
snapshot that vanishes mid-download (replaced by a newer one) just means
replaying from the start: snapshots only ever save time. So does one written
by code of another replica FORMAT: its files are under another name, and
this code finds none.

The copy itself runs on an OS thread even where gevent patched threading
(the API's default worker class): ``VACUUM INTO`` and the file copy never
yield, and on a greenlet they would stall every request of the process.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from flowpool.blobs import BlobNotFound, BlobStore

from .replica import FORMAT

if TYPE_CHECKING:
    from .manifest import Manifest, Manifests
    from .replica import Replica

__all__ = ["Snapshots"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Snapshots:
    """Takes snapshots after writes and seeds new replicas from them."""

    def __init__(self, blobs: BlobStore, manifests: Manifests, every: int) -> None:
        self.blobs = blobs
        self.manifests = manifests
        self.every = every
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @staticmethod
    def _names(manifest: Manifest, seq: int) -> tuple[str, str]:
        base = f"{manifest.prefix}snapshots/{seq}/{FORMAT}/"
        return base + "replica.sqlite3", base + "vectors.f32"

    def maybe_take(self, manifest: Manifest, replica: Replica, seq: int) -> None:
        """After batch ``seq`` was written: snapshot the replica in the background when it is time."""
        if seq % self.every:
            return
        thread = threading.Thread(target=self.take, args=(manifest, replica), name="datastore-snapshot", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the snapshots this process is taking (tests; a process that stops)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def take(self, manifest: Manifest, replica: Replica) -> int:
        """Snapshot ``replica`` now; the seq it holds (0 when it was not newer than the manifest's)."""
        try:
            with tempfile.TemporaryDirectory(prefix="flowpool-snapshot-", dir=replica.dir.parent) as tmp:
                seq, db, vectors = _off_the_loop(replica.export, Path(tmp))
                previous = self.manifests.snapshot_seq(manifest.account_id, manifest.spec.name)
                if seq <= previous:
                    return 0
                db_name, vectors_name = self._names(manifest, seq)
                self.blobs.put_file(vectors_name, vectors)
                self.blobs.put_file(db_name, db)
            if not self.manifests.record_snapshot(manifest, seq):
                self.blobs.delete(db_name, vectors_name)  # a newer one won, or the store is gone
                return 0
            if previous:
                self.blobs.delete(*self._names(manifest, previous))
            return seq
        except Exception:  # noqa: BLE001 - a snapshot only saves time; the log stays the truth
            log.exception("snapshot of datastore %s of account %s failed", manifest.spec.name, manifest.account_id)
            return 0

    def seeder(self, manifest: Manifest) -> Callable[[Path, Path], bool]:
        """What a new replica of ``manifest``'s store calls to start from the latest snapshot."""
        def seed(db_path: Path, vector_path: Path) -> bool:
            seq = self.manifests.snapshot_seq(manifest.account_id, manifest.spec.name)
            if not seq:
                return False
            db_name, vectors_name = self._names(manifest, seq)
            try:
                self.blobs.download(vectors_name, vector_path)
                self.blobs.download(db_name, db_path)
            except BlobNotFound:
                return False
            return True
        return seed


def _off_the_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on an OS thread of gevent's pool when gevent patched threading; else here and now."""
    try:
        from gevent import get_hub, monkey
    except ImportError:
        return function(*args)
    if not monkey.is_module_patched("threading"):
        return function(*args)
    return get_hub().threadpool.apply(function, args)
