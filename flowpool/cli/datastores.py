"""``flowpool datastore create|list|get|ingest|search|delete``: the account's datastores, through the API.

``ingest`` reads a ``.json`` array, ``.jsonl`` or ``.csv`` file and sends it
in batches, each under the server's ingest limit (FLOWPOOL_MAX_INGEST_MB;
``--batch-mb``), with a progress bar. Each batch is
atomic on the server; a batch refused for bad data names the file's lines it
held, and the batches before it stay stored.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import click

from .common import api_call, api_client, describe_error, describe_transport_error, echo_json, load_settings

__all__ = ["COMMANDS", "Batch", "batches", "file_rows"]

# What one ingest request carries at most, unless --batch-mb says otherwise: well under the
# default FLOWPOOL_MAX_INGEST_MB (64), small enough that the progress bar moves.
DEFAULT_BATCH_MB = 8.0
DEFAULT_BATCH_RECORDS = 5000

JSONL = "application/x-ndjson"
CSV = "text/csv"


@dataclass
class Batch:
    """Rows of a file sent in one request: ``body`` (with the CSV header, if any), and where they came from."""

    body: bytes
    content_type: str
    lines: list[int]  # the file's line (a JSON array: record position) of each row, in order
    source_bytes: int  # of the file, for the progress bar

    @property
    def records(self) -> int:
        return len(self.lines)

    def where(self, error: dict[str, Any]) -> int | None:
        """The file line of the row a server error names (its ``line`` detail, or "record N:"), if any."""
        row = None
        if isinstance(error.get("line"), int):
            row = error["line"] - (2 if self.content_type == CSV else 1)  # a CSV body starts with its header
        else:
            match = re.match(r"record (\d+):", str(error.get("message") or ""))
            row = int(match.group(1)) - 1 if match else None
        return self.lines[row] if row is not None and 0 <= row < len(self.lines) else None


def file_rows(path: Path) -> tuple[str, bytes, Iterator[tuple[int, bytes, int]]]:
    """A file's content type, header (CSV) and rows as (line, bytes to send, bytes of the file they took).

    JSONL lines go as they are, so the server judges them; a JSON array is
    read whole and each record sent as a JSONL line; CSV rows are re-written
    one per line by the csv module, so a quoted field spanning lines stays whole.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or suffix == ".ndjson":
        return JSONL, b"", _jsonl_rows(path)
    if suffix == ".json":
        return JSONL, b"", _json_rows(path)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
        if header is None:
            raise click.ClickException(f"{path} is empty: a CSV file starts with a header row")
        return CSV, _csv_line(header), _csv_rows(path)
    raise click.ClickException(f"{path}: give a .json (an array of records), .jsonl or .csv file")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, bytes, int]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, line.rstrip(b"\r\n") + b"\n", len(line)


def _json_rows(path: Path) -> Iterator[tuple[int, bytes, int]]:
    try:
        records = json.loads(path.read_bytes())
    except ValueError as exc:
        raise click.ClickException(f"{path} is not JSON: {exc}") from exc
    if not isinstance(records, list):
        raise click.ClickException(f"{path} holds a JSON {type(records).__name__}; ingest takes an array of records")
    size = path.stat().st_size // max(1, len(records))
    for number, record in enumerate(records, 1):  # "line" here is the record's position in the array
        yield number, json.dumps(record).encode() + b"\n", size


def _csv_line(row: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(row)
    return out.getvalue().encode()


def _csv_rows(path: Path) -> Iterator[tuple[int, bytes, int]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        for row in reader:
            data = _csv_line(row)
            yield reader.line_num, data, len(data)


def batches(content_type: str, header: bytes, rows: Iterable[tuple[int, bytes, int]], max_bytes: int,
            max_records: int = DEFAULT_BATCH_RECORDS) -> Iterator[Batch]:
    """``rows`` packed into bodies of at most ``max_bytes`` (header included) and ``max_records`` rows each.

    A row too large for any batch goes alone, and the server's 413 names it.
    """
    parts: list[bytes] = []
    lines: list[int] = []
    size, taken = len(header), 0
    for line, data, source in rows:
        if parts and (size + len(data) > max_bytes or len(parts) >= max_records):
            yield Batch(header + b"".join(parts), content_type, lines, taken)
            parts, lines, size, taken = [], [], len(header), 0
        parts.append(data)
        lines.append(line)
        size += len(data)
        taken += source
    if parts:
        yield Batch(header + b"".join(parts), content_type, lines, taken)


@click.group("datastore")
def datastore() -> None:
    """Datastores: records searched by id, keyword (BM25) and vector (cosine)."""


@datastore.command("create")
@click.argument("name")
@click.option("--id-field", required=True, help="The field holding each record's id.")
@click.option("--text-field", "text_fields", multiple=True, help="A field searched by keyword (repeatable).")
@click.option("--vector-field", default=None, help="The field holding each record's vector.")
@click.option("--vector-dims", type=int, default=None, help="The vectors' dimension.")
@click.option("--filter", "filters", multiple=True, help="A field searches may filter on by equality (repeatable).")
@click.option("--embedding", "embedding_json", default=None, metavar="JSON",
              help='An embedding endpoint: {"base_url", "model", "api_key_env"}.')
def create(name: str, id_field: str, text_fields: tuple[str, ...], vector_field: str | None,
           vector_dims: int | None, filters: tuple[str, ...], embedding_json: str | None) -> None:
    """Create datastore NAME."""
    try:
        embedding = json.loads(embedding_json) if embedding_json is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--embedding") from exc
    client = api_client(load_settings())
    echo_json(api_call(client.datastores.create, name, id_field, list(text_fields), vector_field=vector_field,
                       vector_dims=vector_dims, filters=list(filters) or None, embedding=embedding))


@datastore.command("list")
def list_stores() -> None:
    """List the account's datastores: name, records, version."""
    client = api_client(load_settings())
    offset, page = 0, 100
    while True:
        stores = api_call(client.datastores.list, offset, page)
        if not stores and not offset:
            click.echo("no datastores yet; create one with: flowpool datastore create NAME --id-field id "
                       "--text-field FIELD", err=True)
        for store in stores:
            click.echo(f"{store.name}\t{store.get('records')} records\tversion {store.get('version')}")
        if len(stores) < page:
            return
        offset += page


@datastore.command("get")
@click.argument("name")
@click.argument("record_id", required=False)
def get(name: str, record_id: str | None) -> None:
    """Show datastore NAME, or its record RECORD_ID."""
    client = api_client(load_settings())
    if record_id is None:
        echo_json(api_call(client.datastores.get, name))
    else:
        echo_json(api_call(client.datastores.get_record, name, record_id))


@datastore.command("delete")
@click.argument("name")
@click.option("--id", "ids", multiple=True, help="Delete only these records (repeatable); else the whole store.")
def delete(name: str, ids: tuple[str, ...]) -> None:
    """Delete datastore NAME, or some of its records."""
    client = api_client(load_settings())
    if ids:
        echo_json(api_call(client.datastores.delete_records, name, list(ids)))
    else:
        echo_json(api_call(client.datastores.delete, name))


@datastore.command("search")
@click.argument("name")
@click.option("--query", default=None, help="Keyword search (BM25 over the store's text fields).")
@click.option("--vector", "vector_json", default=None, metavar="JSON", help="Vector search: a JSON list of numbers.")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=VALUE", help="Equality filter (repeatable).")
@click.option("--limit", type=int, default=10, show_default=True)
def search(name: str, query: str | None, vector_json: str | None, filters: tuple[str, ...], limit: int) -> None:
    """Search datastore NAME by --query, --vector or both; print the results as JSON."""
    try:
        vector = json.loads(vector_json) if vector_json is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--vector") from exc
    if query is None and vector is None:
        raise click.UsageError("give --query, --vector or both")
    equal: dict[str, Any] = {}
    for item in filters:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise click.BadParameter(f"{item!r} is not FIELD=VALUE", param_hint="--filter")
        equal[field] = value
    client = api_client(load_settings())
    echo_json(api_call(client.datastores.search, name, query=query, vector=vector, limit=limit,
                       filters=equal or None))


@datastore.command("ingest")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch-mb", type=float, default=DEFAULT_BATCH_MB, show_default=True,
              help="Most MB per request; keep it under the server's FLOWPOOL_MAX_INGEST_MB.")
@click.option("--batch-records", type=click.IntRange(min=1), default=DEFAULT_BATCH_RECORDS, show_default=True)
def ingest(name: str, file: Path, batch_mb: float, batch_records: int) -> None:
    """Upsert the records of FILE (.json array, .jsonl or .csv) into datastore NAME, in batches."""
    from ..sdk.errors import APIError

    client = api_client(load_settings())
    api_call(client.datastores.get, name)  # a store that is not there is said before the file is read
    content_type, header, rows = file_rows(file)
    done = 0
    with click.progressbar(length=file.stat().st_size, label=f"ingesting {file.name}", file=sys.stderr,
                           show_pos=False, show_percent=True) as bar:
        for batch in batches(content_type, header, rows, int(batch_mb * (1 << 20)), batch_records):
            try:
                _send(client.datastores.ingest, name, body=batch.body, content_type=batch.content_type)
            except APIError as exc:
                raise click.ClickException(_refusal(file, batch, exc, done)) from exc
            done += batch.records
            bar.update(batch.source_bytes)
    click.echo(f"{done} records upserted into {name}")


def _refusal(file: Path, batch: Batch, exc: Any, done: int) -> str:
    """Why a batch was refused, naming the file's line where the server named one of the batch."""
    error = exc.body.get("error") if isinstance(exc.body, dict) else None
    line = batch.where(error) if isinstance(error, dict) else None
    unit = "record" if file.suffix.lower() == ".json" else "line"
    text = describe_error(exc)
    if line is not None:
        text = re.sub(r"^(\d+ \w+: )(line|record) \d+: ", rf"\g<1>{unit} {line}: ", text)
    if exc.status_code == 413:
        text += " (lower --batch-mb under the server's FLOWPOOL_MAX_INGEST_MB)"
    return (f"{file}: the batch of {unit}s {batch.lines[0]}-{batch.lines[-1]} was refused, and nothing of it "
            f"stored ({done} records before it were): {text}")


def _send(fn, *args: Any, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
    """``fn(...)`` with the API's errors raised as they are (the caller names the batch), a lost API as one line."""
    from ..sdk.errors import APIConnectionError

    try:
        return fn(*args, **kwargs)
    except APIConnectionError as exc:
        raise click.ClickException(describe_transport_error(
            exc, " (a batch over the server's ingest limit is cut off too: try a lower --batch-mb)")) from exc


COMMANDS = [datastore]
