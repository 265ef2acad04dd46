"""What a datastore is (its spec, checked at create) and what a batch of its records must look like.

A spec names the record fields the engine reads: ``id_field`` (the key of the
upsert; ids are strings, integers are converted), ``text_fields`` (ranked by
BM25, joined in that order), ``vector_field`` with ``vector_dims`` (ranked by
cosine), ``filters`` (fields that equality filters may name) and
``embedding`` (an OpenAI-compatible endpoint that embeds the records and the
queries that come without a vector). Everything else in a record is kept as
ingested and given back with it.

These checks do no I/O: a request is checked whole before anything of it is
stored, so a bad record loses nothing.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowpool.errors import RequestError
from flowpool.registry.names import BASE_URL, is_name

__all__ = ["MAX_DIMS", "MAX_ID_CHARS", "Batch", "Spec", "check_spec", "prepare_upserts", "check_ids", "filter_values"]

MAX_DIMS = 4096
MAX_ID_CHARS = 512
_SPEC_KEYS = {"name", "id_field", "text_fields", "vector_field", "vector_dims", "filters", "embedding"}
_EMBEDDING_KEYS = {"base_url", "model", "api_key_env"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


@dataclass(frozen=True)
class Spec:
    """A checked datastore spec."""

    name: str
    id_field: str = "id"
    text_fields: tuple[str, ...] = ()
    vector_field: str | None = None
    vector_dims: int | None = None
    filters: tuple[str, ...] = ()
    embedding: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "id_field": self.id_field, "text_fields": list(self.text_fields),
                "vector_field": self.vector_field, "vector_dims": self.vector_dims, "filters": list(self.filters),
                "embedding": dict(self.embedding) if self.embedding else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Spec:
        return cls(name=data["name"], id_field=data["id_field"], text_fields=tuple(data["text_fields"]),
                   vector_field=data.get("vector_field"), vector_dims=data.get("vector_dims"),
                   filters=tuple(data.get("filters") or ()), embedding=data.get("embedding"))

    def text_of(self, record: dict[str, Any]) -> str:
        """The text BM25 ranks the record by: its text fields in order, one per line (absent or null: empty)."""
        parts = []
        for name in self.text_fields:
            value = record.get(name)
            if value is not None:
                parts.append(value if isinstance(value, str) else _json_text(value))
        return "\n".join(parts)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _field_name(key: str, value: Any) -> str:
    if not is_name(value):
        raise RequestError(f"{key} must be a field name (1-64 letters, digits, '_', '-' or '.', starting with a "
                           f"letter or digit), not {value!r}", param=key)
    return value


def _name_list(spec: dict[str, Any], key: str) -> tuple[str, ...]:
    value = spec.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RequestError(f"{key} must be a list of field names", param=key)
    names = tuple(_field_name(key, item) for item in value)
    if len(set(names)) != len(names):
        raise RequestError(f"{key} names a field twice", param=key)
    return names


def check_spec(spec: Any) -> Spec:
    """The :class:`Spec` of a create body, or a 400 naming the first thing wrong with it."""
    if not isinstance(spec, dict):
        raise RequestError("the body must be a JSON object: {name, id_field, text_fields, vector_field?, "
                           "vector_dims?, filters?, embedding?}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; a datastore has {', '.join(sorted(_SPEC_KEYS))}",
                           param=unknown[0])
    name = spec.get("name")
    if not is_name(name):
        raise RequestError(f"invalid datastore name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting "
                           "with a letter or digit", param="name")
    id_field = _field_name("id_field", spec.get("id_field", "id"))
    text_fields = _name_list(spec, "text_fields")
    filters = _name_list(spec, "filters")
    vector_field, dims = spec.get("vector_field"), spec.get("vector_dims")
    if vector_field is not None:
        _field_name("vector_field", vector_field)
        if vector_field == id_field or vector_field in text_fields or vector_field in filters:
            raise RequestError("vector_field must be a field of its own, not the id, a text or a filter field",
                               param="vector_field")
        if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= MAX_DIMS:
            raise RequestError(f"vector_dims must be an integer from 1 to {MAX_DIMS} with a vector_field",
                               param="vector_dims")
    elif dims is not None:
        raise RequestError("vector_dims needs a vector_field", param="vector_dims")
    embedding = _check_embedding(spec.get("embedding"), vector_field, text_fields)
    return Spec(name=name, id_field=id_field, text_fields=text_fields, vector_field=vector_field, vector_dims=dims,
                filters=filters, embedding=embedding)


def _check_embedding(value: Any, vector_field: str | None, text_fields: tuple[str, ...]) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - _EMBEDDING_KEYS:
        raise RequestError("embedding must be an object {base_url, model, api_key_env?}", param="embedding")
    if vector_field is None or not text_fields:
        raise RequestError("embedding needs a vector_field (where the vectors go) and text_fields (what is embedded)",
                           param="embedding")
    base_url, model, key_env = value.get("base_url"), value.get("model"), value.get("api_key_env")
    if not isinstance(base_url, str) or not re.fullmatch(BASE_URL, base_url):
        raise RequestError(f"embedding.base_url must be an http(s) URL, not {base_url!r}", param="embedding.base_url")
    if not isinstance(model, str) or not model.strip() or len(model) > 256:
        raise RequestError("embedding.model must be a model name", param="embedding.model")
    checked = {"base_url": base_url, "model": model}
    if key_env is not None:
        if not isinstance(key_env, str) or not _ENV_NAME.fullmatch(key_env):
            raise RequestError("embedding.api_key_env must name an environment variable", param="embedding.api_key_env")
        checked["api_key_env"] = key_env
    return checked


@dataclass
class Batch:
    """One checked request: records to upsert (without their vectors), their vectors, ids to delete."""

    upserts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (id, record)
    # Row i of ``vectors`` belongs to upserts[vector_rows[i]] (records without a vector have none).
    vector_rows: list[int] = field(default_factory=list)
    vectors: np.ndarray | None = None
    deletes: list[str] = field(default_factory=list)


def record_id(spec: Spec, record: dict[str, Any], where: str) -> str:
    """The record's id as a string, or a 400 saying where the record is."""
    value = record.get(spec.id_field)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(f"{where}: the id field {spec.id_field!r} must be a string or an integer, not "
                           f"{type(value).__name__ if value is not None else 'missing'}", param=spec.id_field)
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS:
        raise RequestError(f"{where}: the id must be 1 to {MAX_ID_CHARS} characters", param=spec.id_field)
    return text


def check_ids(ids: Any) -> list[str]:
    """Ids to delete: strings (integers converted), each once."""
    if not isinstance(ids, list):
        raise RequestError("ids must be a list of record ids", param="ids")
    out: dict[str, None] = {}
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value) \
                or len(str(value)) > MAX_ID_CHARS:
            raise RequestError(f"not a record id: {value!r}", param="ids")
        out[str(value)] = None
    return list(out)


def prepare_upserts(spec: Spec, records: list[Any], max_records: int, max_bytes: int) -> Batch:
    """A :class:`Batch` upserting ``records`` (the last of two with one id wins), or a 400 naming the record.

    A vector is a list of numbers here; a CSV cell's JSON array became one in :mod:`.parsing`.
    """
    if not isinstance(records, list):
        raise RequestError("records must be a list of objects")
    if len(records) > max_records:
        raise RequestError(f"{len(records)} records in one request; at most {max_records} "
                           "(FLOWPOOL_DATASTORE_BATCH_MAX_RECORDS): send them in batches")
    by_id: dict[str, tuple[dict[str, Any], Any]] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RequestError(f"record {index + 1}: must be an object, not {type(record).__name__}")
        rid = record_id(spec, record, f"record {index + 1}")
        body = {key: value for key, value in record.items() if key != spec.vector_field}
        body[spec.id_field] = rid
        vector = record.get(spec.vector_field) if spec.vector_field else None
        size = len(json.dumps(body, ensure_ascii=False, separators=(",", ":")))
        if size > max_bytes:
            raise RequestError(f"record {rid!r}: {size} bytes as JSON; at most {max_bytes} "
                               "(FLOWPOOL_DATASTORE_RECORD_MAX_BYTES)", record=rid)
        by_id.pop(rid, None)
        by_id[rid] = (body, vector)
    batch = Batch()
    vectors = []
    for rid, (body, vector) in by_id.items():
        if vector is not None:
            batch.vector_rows.append(len(batch.upserts))
            vectors.append(vector)
        batch.upserts.append((rid, body))
    if vectors:
        batch.vectors = _matrix(spec, vectors, [batch.upserts[i][0] for i in batch.vector_rows])
    return batch


def _matrix(spec: Spec, vectors: list[Any], ids: list[str]) -> np.ndarray:
    """The vectors as a float32 matrix, or a 400 naming the first record whose vector is wrong."""
    try:
        matrix = np.asarray(vectors)
    except ValueError:  # ragged
        matrix = np.asarray([])
    if matrix.ndim == 2 and matrix.shape[1] == spec.vector_dims and matrix.dtype.kind in "fiu":
        with np.errstate(over="ignore"):
            matrix = matrix.astype(np.float32)
        if np.isfinite(matrix).all():  # in float32: 1e39 is finite as a float64 but inf as a float32
            return matrix
    for rid, vector in zip(ids, vectors):
        check_vector(spec, vector, f"record {rid!r}", record=rid)
    raise RequestError(f"the {spec.vector_field!r} vectors must be lists of {spec.vector_dims} numbers")


def check_vector(spec: Spec, vector: Any, where: str, **details: Any) -> np.ndarray:
    """A vector of the store's dimension as float32, or a 400 saying what is wrong with it."""
    if not isinstance(vector, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in vector):
        raise RequestError(f"{where}: {spec.vector_field!r} must be a list of numbers", **details)
    if len(vector) != spec.vector_dims:
        raise RequestError(f"{where}: {spec.vector_field!r} has {len(vector)} dimensions; the store's vectors have "
                           f"{spec.vector_dims}", **details)
    try:
        with np.errstate(over="ignore"):
            checked = np.asarray(vector, dtype=np.float64).astype(np.float32)
    except OverflowError:  # an integer beyond any float
        checked = np.asarray([np.inf], dtype=np.float32)
    if not np.isfinite(checked).all():
        raise RequestError(f"{where}: {spec.vector_field!r} holds a value that is not a finite number "
                           "(as a float32: at most about 3.4e38)", **details)
    return checked


def filter_values(value: Any) -> list[str]:
    """The keys a record's filter field value is indexed under (a list: each of its scalars), canonical JSON."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if item is None or isinstance(item, (str, int, float, bool)):
            out.append(json.dumps(item, ensure_ascii=False))
    return out
