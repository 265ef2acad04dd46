"""The bytes of one batch blob: what one ingest or delete request changed, written once and never changed.

Layout (all integers little-endian)::

    b"FPDSB1\\n"                      magic and format version
    u32 H                            length of the header
    H bytes of JSON                  {"upserts": [[id, record], ...], "vector_rows": [i, ...],
                                      "dims": d, "deletes": [id, ...]}
    len(vector_rows) * d float32     the vectors, row r belonging to upserts[vector_rows[r]]

Vectors travel as raw float32 (a 384-dimension vector is 1.5 KB, not the
~8 KB of its JSON) so replaying a batch costs one ``frombuffer``.
"""
from __future__ import annotations

import json
import struct

import numpy as np

from .spec import Batch

__all__ = ["decode_batch", "encode_batch"]

_MAGIC = b"FPDSB1\n"


def encode_batch(batch: Batch, dims: int | None) -> bytes:
    """The blob bytes of ``batch``."""
    header = json.dumps({"upserts": batch.upserts, "vector_rows": batch.vector_rows, "dims": dims or 0,
                         "deletes": batch.deletes}, ensure_ascii=False, separators=(",", ":")).encode()
    vectors = b"" if batch.vectors is None else np.ascontiguousarray(batch.vectors, dtype="<f4").tobytes()
    return b"".join((_MAGIC, struct.pack("<I", len(header)), header, vectors))


def decode_batch(data: bytes) -> Batch:
    """The batch stored in ``data``; ValueError if it is not one."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a datastore batch")
    start = len(_MAGIC)
    (size,) = struct.unpack_from("<I", data, start)
    header = json.loads(data[start + 4:start + 4 + size])
    rows, dims = header["vector_rows"], header["dims"]
    vectors = None
    if rows:
        vectors = np.frombuffer(data, dtype="<f4", offset=start + 4 + size, count=len(rows) * dims)
        vectors = vectors.reshape(len(rows), dims)
    return Batch(upserts=[(rid, record) for rid, record in header["upserts"]], vector_rows=rows, vectors=vectors,
                 deletes=header["deletes"])
