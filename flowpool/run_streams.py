"""Reading a run's event streams (flowpool.runs): its chunks and ``done`` (``keys.run_events``), and its log lines
(``keys.run_logs``), put back in the order the run sent them."""
from __future__ import annotations

import json
import math
from typing import Any, Iterator

__all__ = ["READ", "chunks_of", "in_order"]

# Entries one XREAD reads at most from each stream.
READ = 500


def in_order(reply: Any, stream: str, lines: str | None) -> Iterator[tuple[str, bytes, dict[bytes, bytes]]]:
    """The entries one XREAD read of a run's events and (``lines``) its log lines, as ``(key, entry id, fields)``,
    in the order the run sent them: a line before the first chunk not emitted before it (its ``after``), ``done``
    last.

    Its worker writes a chunk and the lines logged before it in one step, so a read holds every line logged before
    a chunk it holds and every chunk emitted before a line it holds, unless that stream's part was cut at ``READ``
    entries: then what may follow entries past the cut waits for the next read.
    """
    read = {key.decode(): entries for key, entries in reply}
    events, logged = read.get(stream, []), read.get(lines, []) if lines else []
    more_events, more_lines = len(events) >= READ, len(logged) >= READ
    e = n = 0
    while e < len(events) or n < len(logged):
        if e < len(events) and n < len(logged):
            line_first = int(logged[n][1][b"after"]) <= _chunk_index(events[e][1])
        elif (more_events if n < len(logged) else more_lines):
            return
        else:
            line_first = n < len(logged)
        if line_first:
            assert lines is not None
            yield lines, *logged[n]
            n += 1
        else:
            yield stream, *events[e]
            e += 1


def _chunk_index(fields: dict[bytes, bytes]) -> float:
    """A chunk entry's index; ``done``, which comes after every line, as infinity."""
    return json.loads(fields[b"data"])["index"] if fields.get(b"kind") == b"chunk" else math.inf


def chunks_of(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """The chunks among a run's events-stream entries, as its record shows them (without their index)."""
    chunks = [json.loads(fields[b"data"]) for _, fields in entries if fields.get(b"kind") == b"chunk"]
    for chunk in chunks:
        chunk.pop("index", None)
    return chunks
