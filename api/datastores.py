"""Datastores: create, list, get, delete; ingest and delete records; get a record by id; search.

Every route goes through the process's :class:`~flowpool.datastores.Datastores`
engine, per account: another account's store reads as one that does not
exist (404). Ingest takes a JSON array, JSONL or CSV (by Content-Type), up to
FLOWPOOL_MAX_INGEST_MB per request, and is atomic: a body with one bad line
or record is a 400 naming it, and nothing of it is stored.
"""
from __future__ import annotations

from typing import Any, Optional

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from flowpool.datastores import MAX_SEARCH_LIMIT, parse_records
from flowpool.errors import NotFound, RequestError

from .body import own_body_limit
from .parsing import json_body, model_from, page_args, paginated
from .services import authenticate, services

__all__ = ["DeleteRecordsRequest", "SearchRequest", "bp"]

bp = Blueprint("datastores", __name__, url_prefix="/api/v1/datastores")


class SearchRequest(BaseModel):
    """``POST .../search``: keyword search with ``query``, vector search with ``vector``, a hybrid with both."""

    model_config = ConfigDict(extra="forbid")

    query: Optional[StrictStr] = Field(None, description="Text ranked by BM25 over the store's text_fields")
    vector: Optional[list[StrictFloat | StrictInt]] = Field(None, description="Ranked by cosine similarity")
    limit: int = Field(10, ge=1, le=MAX_SEARCH_LIMIT)
    filters: Optional[dict[str, Any]] = Field(None, description="Equality on the store's declared filter fields")


class DeleteRecordsRequest(BaseModel):
    """``DELETE .../records``: the ids to remove (ids not stored are skipped; integers are their decimal strings).

    How many one request may name is the engine's rule, FLOWPOOL_DATASTORE_BATCH_MAX_RECORDS, as for an ingest.
    """

    model_config = ConfigDict(extra="forbid")

    ids: list[StrictStr | StrictInt] = Field(min_length=1)


def _ingest_limit(settings: Any) -> int:
    return int(settings.max_ingest_mb * (1 << 20))


@bp.post("")
def create_datastore():  # type: ignore[no-untyped-def]
    """Create a datastore."""
    svc, account = services(), authenticate()
    spec = json_body()
    if not isinstance(spec, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(spec).__name__}")
    embedding = spec.get("embedding")
    if isinstance(embedding, dict) and isinstance(embedding.get("api_key_env"), str):
        # The same rule as an application's routes: only keys the operator lists, only to their host.
        svc.provider_keys.check({"embedding.api_key_env": (embedding["api_key_env"],
                                                           str(embedding.get("base_url") or ""))})
    return jsonify({"data": svc.datastores.create(account.id, spec)}), 201


@bp.get("")
def list_datastores():  # type: ignore[no-untyped-def]
    """The account's datastores."""
    svc, account = services(), authenticate()
    offset, limit = page_args()
    stores = svc.datastores.list(account.id)
    return jsonify(paginated(stores[offset:offset + limit], len(stores), offset, limit))


@bp.get("/<name>")
def get_datastore(name: str):  # type: ignore[no-untyped-def]
    """A datastore: its spec, record count and version."""
    svc, account = services(), authenticate()
    return jsonify({"data": svc.datastores.get(account.id, name)})


@bp.delete("/<name>")
def delete_datastore(name: str):  # type: ignore[no-untyped-def]
    """Delete a datastore and every record of it."""
    svc, account = services(), authenticate()
    svc.datastores.delete(account.id, name)
    return jsonify({"data": {"name": name, "deleted": True}})


@bp.post("/<name>/records")
@own_body_limit(_ingest_limit)
def ingest(name: str):  # type: ignore[no-untyped-def]
    """Upsert records by id: a JSON array, JSONL (application/x-ndjson) or CSV (text/csv); atomic."""
    svc, account = services(), authenticate()
    store = svc.datastores.get(account.id, name)  # another account's store is a 404 before its body is parsed
    records = parse_records(request.get_data(cache=False), request.content_type or "application/json",
                            store.get("vector_field"))
    return jsonify({"data": svc.datastores.ingest(account.id, name, records)})


@bp.delete("/<name>/records")
def delete_records(name: str):  # type: ignore[no-untyped-def]
    """Delete records by id: ``{"ids": [...]}``."""
    svc, account = services(), authenticate()
    body = model_from(DeleteRecordsRequest, json_body())
    return jsonify({"data": svc.datastores.delete_records(account.id, name, list(body.ids))})


@bp.get("/<name>/records/<path:record_id>")
def get_record(name: str, record_id: str):  # type: ignore[no-untyped-def]
    """One record by its id, as ingested."""
    svc, account = services(), authenticate()
    record = svc.datastores.get_record(account.id, name, record_id)
    if record is None:
        raise NotFound(f"datastore {name!r} has no record with id {record_id!r}")
    return jsonify({"data": record})


@bp.post("/<name>/search")
def search(name: str):  # type: ignore[no-untyped-def]
    """Records ranked by keyword (BM25), by vector (cosine), or both (reciprocal rank fusion), with their scores."""
    svc, account = services(), authenticate()
    body = model_from(SearchRequest, json_body())
    vector = None if body.vector is None else [float(x) for x in body.vector]
    return jsonify({"data": svc.datastores.search(account.id, name, query=body.query, vector=vector,
                                                  limit=body.limit, filters=body.filters)})
