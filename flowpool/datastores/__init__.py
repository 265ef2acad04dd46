"""Datastores: per-account record stores queried by id, by keyword (BM25) and by vector (cosine).

- :mod:`.spec`: what a store is and what its records must be (no I/O);
- :mod:`.parsing`: records from a JSON array, JSON lines or CSV body;
- :mod:`.manifest`: the manifest and batch log in Redis;
- :mod:`.batch`: the bytes of one batch blob;
- :mod:`.replica`: a host's local copy (SQLite FTS5 + a float32 vector file);
- :mod:`.search`: reading a replica;
- :mod:`.snapshots`: replica snapshots in the blob store;
- :mod:`.store`: :class:`Datastores`, the engine the API and the workers use;
- :mod:`.embedding`: a store's embedding endpoint.

docs/datastores.md says why these engines and how many hosts share a store.
"""
from __future__ import annotations

from flowpool.errors import DatastoreNotFound

from .parsing import parse_records
from .store import MAX_SEARCH_LIMIT, Datastores, Embedder

__all__ = ["MAX_SEARCH_LIMIT", "DatastoreNotFound", "Datastores", "Embedder", "parse_records"]
