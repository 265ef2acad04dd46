"""A running run's calls as they go: its worker publishes each when it starts and when it ends; readers merge them.

A run's record gets its ``model_calls``, ``http_calls`` and ``workflow_calls``
only with its end. Until then its worker (:class:`LiveCalls`) pushes one
entry per call start and one per call end onto the run's list
(``keys.run_calls``), each ``{"id": call id, "list": "model" | "http" |
"workflow", "call": the call's entry}``:

- a model or agent call, and a workflow called inline, when it starts: its
  record's fields so far with ``"status": "running"``; and when it ends: its
  entry as the record keeps it (a workflow call's without its ``logs``, which
  only the record keeps: they may be large);
- an HTTP call when it ends (its entry is made then);
- ``"call": null`` for a started call that left no entry in the record (a
  model route given up before its request went out): :func:`merge` drops it.

Entries are redacted of the run's secrets as the record's lists are. The list
is bounded as the record's HTTP calls are: per list, at most
:data:`MAX_LIVE_CALLS` calls and about :data:`MAX_LIVE_BYTES` of entries;
calls past that are not shown live (the record says what it keeps of them).

Publishing is best effort and costs one Redis command per entry (``RPUSH``;
the first write of a run also sets the key's life, ``PEXPIRE``, in the same
round trip): a Redis that does not take it is logged once, and the entries
wait, as a run's chunks do, for the next write after a pause, so the call
is never failed and an unreachable Redis costs at most one failed round trip
per pause. The list lives until past the run's deadline while it goes; the
run's end, which writes the calls into its record, leaves it a few minutes
more (:meth:`LiveCalls.expire_at_end`, in the end's own transaction).

Readers call :func:`with_live_calls` (a running run's record with its calls
so far), or :func:`read` and :func:`merge` for the lists alone;
:class:`~flowpool.runs.RunStore` offers both as methods.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import replace
from typing import Any, Iterable

import redis

from flowpool import keys
from flowpool.run import Replacements, RunRecord, RunStatus, dumps, redact

__all__ = ["LISTS", "MAX_LIVE_BYTES", "MAX_LIVE_CALLS", "LiveCalls", "merge", "read", "with_live_calls"]

log = logging.getLogger("flowpool.worker")

# The record's field of each list's calls.
LISTS = {"model": "model_calls", "http": "http_calls", "workflow": "workflow_calls"}
# Per list, the most calls shown live, and about the most bytes of their entries: the caps of the record's
# http_calls (tasks.outbound.MAX_RECORDED_HTTP_CALLS and MAX_RECORDED_HTTP_BYTES), so a script that loops over
# calls does not grow the list, which every read of a running run reads whole, without bound.
MAX_LIVE_CALLS = 500
MAX_LIVE_BYTES = 256 << 10


class LiveCalls:
    """Publishes one run's calls (its inline workflows' included) to ``keys.run_calls`` as they start and end."""

    # After a write Redis did not take, entries wait this long (doubling, up to the most) before the next try.
    _RETRY_AFTER = 0.5
    _RETRY_AFTER_MAX = 5.0

    def __init__(self, client: redis.Redis, request_id: str, redactions: Replacements, until: float,
                 tail_ms: int) -> None:
        """``client``: one that gives up quickly (the call waits on the write). ``until``: the ``time.monotonic()``
        past which the run cannot be going any more (its hard limit and Redis outage allowance); the list lives
        ``tail_ms`` past that, and ``tail_ms`` past the run's end."""
        self.client, self.key, self.redactions = client, keys.run_calls(request_id), redactions
        self.request_id, self.until, self.tail_ms = request_id, until, tail_ms
        self.published = False  # whether any write was tried: the end then shortens the list's life
        self._ids = itertools.count(1)
        # The calls started and not ended: id(entry given to start) -> (that entry, held so its id is not reused,
        # its list, its call id).
        self._open: dict[int, tuple[dict[str, Any], str, str]] = {}
        self._calls = dict.fromkeys(LISTS, 0)
        self._bytes = dict.fromkeys(LISTS, 0)
        self._pending: list[str] = []
        self._expiry_set = False
        self._next_try = 0.0
        self._retry_after = self._RETRY_AFTER
        self._warned = False
        self._lock = threading.Lock()

    def start(self, kind: str, entry: dict[str, Any]) -> None:
        """Publish a call of list ``kind`` starting now, ``entry`` its fields so far (shown with status running);
        past the caps it is not shown live, nor is its end."""
        with self._lock:
            call_id = self._new_id(kind)
            if call_id is not None:
                self._open[id(entry)] = (entry, kind, call_id)
                self._publish(call_id, kind, {**entry, "status": "running"})

    def end(self, kind: str, entry: dict[str, Any], started: dict[str, Any] | None = None) -> None:
        """Publish a call's end, ``entry`` as the record keeps it, under the id of its start (``started``, the entry
        :meth:`start` was given, by default ``entry`` itself); a call never started (HTTP) gets an id now."""
        with self._lock:
            call_id = self._close(started if started is not None else entry) or self._new_id(kind)
            if call_id is not None:
                self._publish(call_id, kind, entry)

    def drop(self, started: dict[str, Any]) -> None:
        """Take back the live entry of a call :meth:`start` published with ``started`` that the record will not
        keep (it ended before it was made)."""
        with self._lock:
            kind = self._open[id(started)][1] if id(started) in self._open else ""
            call_id = self._close(started)
            if call_id is not None:
                self._publish(call_id, kind, None)

    def _close(self, started: dict[str, Any]) -> str | None:
        """The call id :meth:`start` gave ``started``, forgotten now; None if it gave none."""
        opened = self._open.get(id(started))
        if opened is None or opened[0] is not started:
            return None
        del self._open[id(started)]
        return opened[2]

    def expire_at_end(self, pipe: Any) -> None:
        """Queue on the run's end's pipeline the list's last few minutes (nothing when nothing was published)."""
        if self.published:
            pipe.pexpire(self.key, self.tail_ms)

    def _new_id(self, kind: str) -> str | None:
        if self._calls[kind] >= MAX_LIVE_CALLS or self._bytes[kind] >= MAX_LIVE_BYTES:
            return None
        self._calls[kind] += 1
        return str(next(self._ids))

    def _publish(self, call_id: str, kind: str, call: dict[str, Any] | None) -> None:
        if kind == "workflow" and call is not None:
            call = {k: v for k, v in call.items() if k != "logs"}
        try:
            data = dumps({"id": call_id, "list": kind, "call": redact(call, self.redactions)})
        except (TypeError, ValueError):  # not JSON (nothing a ctx call records should be): not shown live
            return
        self._bytes[kind] += len(data.encode())
        self._pending.append(data)
        self._write()

    def _write(self) -> None:
        """Push the entries waiting; one Redis did not take waits for the next write after a pause."""
        if time.monotonic() < self._next_try:
            return
        self.published = True
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(self.key, *self._pending)
            if not self._expiry_set:
                pipe.pexpire(self.key, max(1000, int((self.until - time.monotonic()) * 1000) + self.tail_ms))
            pipe.execute()
        except redis.RedisError as exc:
            self._next_try = time.monotonic() + self._retry_after
            self._retry_after = min(2 * self._retry_after, self._RETRY_AFTER_MAX)
            if not self._warned:
                self._warned = True
                log.warning("run %s: its calls are not shown live while Redis does not take them: %s",
                            self.request_id, exc)
            return
        self._pending.clear()
        self._expiry_set = True
        self._retry_after = self._RETRY_AFTER


def merge(entries: Iterable[bytes | str]) -> dict[str, list[dict[str, Any]]]:
    """The calls of a run's live list (its entries as stored), by record field: each call's latest entry, with its
    ``call_id``, in the order the calls started; one taken back (``"call": null``) or unreadable is left out."""
    latest: dict[str, tuple[str, dict[str, Any] | None]] = {}  # a dict keeps each id where it first came
    for raw in entries:
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(item, dict) or item.get("list") not in LISTS or not isinstance(item.get("id"), str):
            continue
        call = item.get("call")
        if call is None or isinstance(call, dict):
            latest[item["id"]] = (item["list"], call)
    merged: dict[str, list[dict[str, Any]]] = {field: [] for field in LISTS.values()}
    for call_id, (kind, call) in latest.items():
        if call is not None:
            merged[LISTS[kind]].append({**call, "call_id": call_id})
    return merged


def read(client: redis.Redis, request_id: str) -> dict[str, list[dict[str, Any]]]:
    """A running run's calls so far by record field (``model_calls``, ``http_calls``, ``workflow_calls``): each
    call's latest entry with its ``call_id``, one still going with status ``running`` (:func:`merge`). One
    LRANGE."""
    return merge(client.lrange(keys.run_calls(request_id), 0, -1))


def with_live_calls(client: redis.Redis, record: RunRecord) -> RunRecord:
    """``record`` with its calls so far while it runs; else as it is (an ended run's record keeps its calls)."""
    if record.status != RunStatus.RUNNING.value:
        return record
    return replace(record, **read(client, record.request_id))
