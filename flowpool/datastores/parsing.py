"""Records from a request body: a JSON array, JSON lines or CSV, chosen by the Content-Type.

Parsing is all or nothing: the first malformed line (JSONL) or row (CSV) is a
400 naming its line number, and the caller stores nothing of the body. In
CSV every value is a string, except a vector column, which holds a JSON
array (``"[0.1, 0.2]"``); an empty vector cell is no vector.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Any

from flowpool.errors import RequestError

__all__ = ["CONTENT_TYPES", "parse_records"]

_JSON = {"application/json"}
_JSONL = {"application/x-ndjson", "application/jsonl", "application/json-lines", "application/x-jsonlines",
          "application/jsonlines"}
_CSV = {"text/csv", "application/csv"}
CONTENT_TYPES = sorted(_JSON | _JSONL | _CSV)


def parse_records(body: bytes, content_type: str, vector_field: str | None = None) -> list[dict[str, Any]]:
    """The records of ``body``; a 400 naming the line (or item) that is malformed.

    ``vector_field``: the CSV column that holds JSON arrays (every other CSV value stays a string).
    """
    kind = (content_type or "").split(";")[0].strip().lower()
    text = _text(body)
    if kind in _JSON:
        return _json_array(text)
    if kind in _JSONL:
        return _json_lines(text)
    if kind in _CSV:
        return _csv(text, vector_field)
    raise RequestError(f"records come as {', '.join(CONTENT_TYPES)}; not {kind or 'no Content-Type'!r}",
                       param="Content-Type")


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = body[:exc.start].count(b"\n") + 1
        raise RequestError(f"line {line}: the body is not UTF-8", line=line) from exc


def _json_array(text: str) -> list[dict[str, Any]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"line {exc.lineno}: malformed JSON ({exc.msg})", line=exc.lineno) from exc
    if isinstance(records, dict) and isinstance(records.get("records"), list):
        records = records["records"]
    if not isinstance(records, list):
        raise RequestError("a JSON body must be an array of records (or JSON lines with application/x-ndjson)")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RequestError(f"record {index + 1}: must be an object, not {type(record).__name__}",
                               record_index=index)
    return records


def _json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    # Only "\n" ends a line (a trailing "\r" goes too): str.splitlines() would also split inside a JSON string
    # holding U+2028, U+2029 or U+0085, which JSON allows there unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RequestError(f"line {number}: malformed JSON ({exc.msg})", line=number) from exc
        if not isinstance(record, dict):
            raise RequestError(f"line {number}: a record must be a JSON object, not {type(record).__name__}",
                               line=number)
        records.append(record)
    return records


def _csv(text: str, vector_field: str | None) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise RequestError(f"line {reader.line_num}: malformed CSV ({exc})", line=reader.line_num) from exc
    if not header or not any(header):
        return []
    if len(set(header)) != len(header) or "" in header:
        raise RequestError("line 1: the CSV header must name each column once", line=1)
    records = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise RequestError(f"line {reader.line_num}: malformed CSV ({exc})", line=reader.line_num) from exc
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0]):
            continue
        if len(row) != len(header):
            raise RequestError(f"line {line}: {len(row)} values for {len(header)} columns", line=line)
        record: dict[str, Any] = dict(zip(header, row))
        if vector_field and vector_field in record:
            record[vector_field] = _csv_vector(record[vector_field], vector_field, line)
        records.append(record)
    return records


def _csv_vector(cell: str, field: str, line: int) -> Any:
    if not cell.strip():
        return None
    try:
        vector = json.loads(cell)
    except json.JSONDecodeError as exc:
        raise RequestError(f"line {line}: the {field!r} column must hold a JSON array of numbers", line=line) from exc
    if not isinstance(vector, list):
        raise RequestError(f"line {line}: the {field!r} column must hold a JSON array of numbers", line=line)
    return vector
