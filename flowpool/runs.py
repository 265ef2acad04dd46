"""The run store: one record per request, its event stream, and waiting for its end.

A run record (:class:`~flowpool.run.RunRecord`) is a Redis hash (``keys.run``); its emitted chunks and, last, one
``done`` entry (:class:`~flowpool.run.RunEnd`) go to a Redis stream (``keys.run_events``) that every waiter
reads without consuming, so any number of callers (single-flight joiners,
the streaming API) can follow one run. A running run's log lines go to
a stream of their own (``keys.run_logs``), read only by those who ask for
them, so a run that logs wakes no waiter; its end writes them into its record.
While a worker runs it, the run has a lease key the worker refreshes; a
running run without a lease belongs to a worker that died.

Every unfinished run is also in one index (``keys.RUNS_ACTIVE``), scored by
its deadline: queued, by when it must have ended if a worker took it at the
last moment; running, by its hard time limit. :meth:`RunStore.reap`, run now
and then by every worker and API process, ends what is still there long past
its deadline, so no record stays queued or running when its worker and its
callers are all gone. Waiters ride out a Redis outage until the run's
deadline plus ``outage_seconds``, then answer that its outcome is unknown.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence, TypeVar

import redis

from flowpool import keys
from flowpool.connections import UNREACHABLE, patiently
from flowpool.errors import OutcomeUnavailable, RunError, RunNotStarted, WorkerLost
from flowpool.quotas import NO_QUOTA_ARGS, NO_QUOTA_KEYS, Quota, end_args, end_keys, refusal, slot_args
from flowpool.run import RunEnd, RunRecord, RunStatus, dumps, encode
from flowpool.run_index import RunIndex
from flowpool.run_scripts import ABANDON, APPEND_CHUNKS, APPEND_OUTPUT, BEGIN, CLAIM, FINISH, RATE, RENEW_SLOT
from flowpool.run_streams import READ, chunks_of, in_order
from flowpool.sealing import InvalidToken, SecretBox
from flowpool.settings import Settings
from flowpool.usage import day_of

__all__ = ["LOG_TAIL_SECONDS", "RunStatus", "RunStore"]

log = logging.getLogger("flowpool.runs")

T = TypeVar("T")

# How long a run's log stream stays once its end has written its lines into its record: long enough for the
# readers following it to read the last ones, short enough that the lines are not kept twice for long.
LOG_TAIL_SECONDS = 300


class RunStore(RunIndex):
    """Read and write run records and their event streams (listing them: :class:`~flowpool.run_index.RunIndex`)."""

    def __init__(self, client: redis.Redis, ttl_seconds: int, runs_per_workflow: int,
                 lease_grace_seconds: float = 0.0, outage_seconds: float = 0.0, usage_days: int = 400,
                 hard_grace_seconds: float = 0.0, runs_per_account: int = 10000) -> None:
        """``lease_grace_seconds``: how long a waiter gives a lapsed lease to come back before taking the run
        for lost (a worker held up with Redis renews it when Redis answers again). ``outage_seconds``: how
        long past a run's deadline a waiter rides out an unreachable Redis. ``usage_days``: how long the
        accounts' daily usage, which runs' ends add to, is kept. ``hard_grace_seconds``: how long past its time
        limit a run may go before it is killed (the compute an end counts is capped at both). ``runs_per_account``:
        how many of an account's newest runs its index keeps (``runs_per_workflow``: of a workflow's)."""
        self.redis = client
        self.ttl_ms = ttl_seconds * 1000
        self.runs_per_workflow = runs_per_workflow
        self.runs_per_account = runs_per_account
        self.lease_grace_seconds = lease_grace_seconds
        self.outage_seconds = outage_seconds
        self.usage_seconds = usage_days * 86400
        self.hard_grace_seconds = hard_grace_seconds
        self._rate = client.register_script(RATE)
        self._claim = client.register_script(CLAIM)
        self._renew = client.register_script(RENEW_SLOT)
        self._begin = client.register_script(BEGIN)
        self._abandon = client.register_script(ABANDON)
        self._finish = client.register_script(FINISH)
        self._append_chunks = client.register_script(APPEND_CHUNKS)
        self._append_output = client.register_script(APPEND_OUTPUT)

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings) -> RunStore:
        """The store as flowpool's processes use it: a lapsed lease gets three heartbeats to come back."""
        return cls(client, settings.run_ttl_seconds, settings.runs_per_workflow,
                   lease_grace_seconds=3 * settings.worker_heartbeat_seconds,
                   outage_seconds=settings.redis_outage_seconds, usage_days=settings.usage_retention_days,
                   hard_grace_seconds=settings.hard_timeout_grace_seconds, runs_per_account=settings.runs_per_account)

    # Writing

    def create(self, pipe: redis.client.Pipeline, record: RunRecord) -> None:
        """Queue the writes that create a run record and index it under its workflow, session and account."""
        request_id = record.request_id
        queued_at = record.queued_at or time.time()
        pipe.hset(keys.run(request_id), mapping=record.to_fields())
        pipe.pexpire(keys.run(request_id), self.ttl_ms)
        index = keys.workflow_runs(record.account, record.workflow)
        pipe.zadd(index, {request_id: queued_at})
        pipe.zremrangebyrank(index, 0, -self.runs_per_workflow - 1)
        if record.session_id:
            session = keys.session_runs(record.account, record.session_id)
            pipe.zadd(session, {request_id: queued_at})
            pipe.pexpire(session, self.ttl_ms)
        account_runs = keys.account_runs(record.account)
        pipe.zadd(account_runs, {request_id: queued_at})
        pipe.zremrangebyrank(account_runs, 0, -self.runs_per_account - 1)
        pipe.pexpire(account_runs, self.ttl_ms)  # it goes when its newest run's record does

    def record(self, record: RunRecord) -> None:
        """Create a run record now (a cache hit whose entry did not carry its record's fields)."""
        pipe = self.redis.pipeline(transaction=False)
        self.create(pipe, record)
        pipe.execute()

    def begin(self, record: RunRecord, cache_keys: tuple[str, str, str] | None = None, lock_seconds: float = 0,
              rev: str = "", idempotency: tuple[str, str, float] | None = None, quota: Quota | None = None,
              join: bool = True) -> tuple[str, Any]:
        """Queue a run record, unless the cache answers or an identical run is in flight.

        With ``cache_keys`` (the keys of the cache entry, the in-flight lock
        and the entry's record fields) returns ``("hit", entry)`` (the hit's
        run record written too), ``("hit-unrecorded", entry)`` (an entry
        without stored record fields: the caller records the hit) or
        ``("join", leader_request_id)`` when the run is not needed; otherwise
        ``("queued", lane)`` after taking the lock and writing the record (``lane``: the run's fair-share lane;
        None without ``quota``). Without ``join`` a run in flight is not joined: the run is queued beside it.
        ``("stale", None)`` when the workflow's revision is no longer ``rev``:
        nothing was written.

        With ``idempotency`` (the key's Redis key, the request's fingerprint,
        the window in seconds), ``("replay", first_request_id)`` when the key
        already names a run for the same request, ``("conflict",
        first_request_id)`` when it names one for another request; either way
        nothing was written.

        With ``quota`` (flowpool.quotas) the account's limits are checked too: over one, QuotaExceeded is
        raised and nothing was written.
        """
        flat = [item for pair in record.to_fields().items() for item in pair]
        entry_key, lock_key, record_key = cache_keys or ("", "", "")
        idem_key, fingerprint, window = idempotency or ("", "", 0)
        account_id, ref, request_id = record.account, record.workflow, record.request_id
        reply = self._begin(
            keys=[keys.run(request_id), keys.workflow_runs(account_id, ref), entry_key, lock_key, record_key,
                  keys.workflow(account_id, ref), keys.session_runs(account_id, record.session_id or ""),
                  keys.METRICS, idem_key, keys.RUNS_ACTIVE, *(quota.keys() if quota else NO_QUOTA_KEYS),
                  keys.account_runs(account_id)],
            args=[request_id, self.ttl_ms, record.queued_at or time.time(), self.runs_per_workflow,
                  int(lock_seconds * 1000), rev, int(window * 1000), fingerprint, keys.run(""), int(join),
                  *(quota.args(ended=record.status != RunStatus.QUEUED) if quota else NO_QUOTA_ARGS),
                  self.runs_per_account, *flat])
        state = reply[0].decode()
        if state == "quota":
            raise refusal(reply)
        if state == "hit":
            return ("hit" if len(reply) > 2 else "hit-unrecorded"), json.loads(reply[1])
        if state in ("join", "replay", "conflict"):
            return state, reply[1].decode()
        return state, int(reply[1]) if len(reply) > 1 else None

    def take_rate(self, quota: Quota) -> None:
        """Count a request admitted outside :meth:`begin` against its account's rate; QuotaExceeded if over."""
        reply = self._rate(keys=[keys.METRICS, keys.account_limits(quota.account_id), keys.account_rate(
            quota.account_id)], args=list(quota.defaults))
        if reply[0] == b"quota":
            raise refusal(reply)

    @staticmethod
    def hit_fields(entry_request_id: str, version: str, output: Any, usage: Any, chunk_count: int) -> dict[str, str]:
        """What a cache hit's run record copies from the run that filled the entry, encoded as stored."""
        return encode({"origin_request_id": entry_request_id, "version": version, "output": output, "usage": usage,
                        "chunk_count": chunk_count})

    def claim(self, request_id: str, worker: str, lease_ms: int, hard_seconds: float = 0.0,
              token: str | None = None) -> bool:
        """Mark a queued run as running on ``worker`` under ``token``; False if it is not queued any more.

        ``hard_seconds`` is how long the run may go from now (its hard time
        limit): past that, and the reaper's margin, an unfinished run is lost.
        ``token`` names this delivery: claiming again with it answers True (a
        retried claim whose first answer was lost), and only it may
        :meth:`finish` the run. Without one, the claim is a new one. The run's concurrency slot is scored by
        the lease's expiry from now on, on Redis's clock (the worker's heartbeat renews both: :meth:`renew_slots`).
        """
        token = token or uuid.uuid4().hex
        now = time.time()
        return bool(self._claim(keys=[keys.run(request_id), keys.run_lease(request_id), keys.RUNS_ACTIVE],
                                args=[dumps(worker), dumps(now), lease_ms, request_id, now + hard_seconds,
                                      dumps(token), *slot_args()]))

    def renew_slots(self, pipe: Any, runs: Sequence[tuple[str, str]], worker: str, lease_ms: int) -> None:
        """Queue on a heartbeat's ``pipe`` the renewal of each run's ``(request_id, account)`` slot with its
        lease while it runs under ``worker`` (RENEW_SLOT): bare EVALSHAs, in the beat's one round trip."""
        for request_id, account in runs:
            pipe.evalsha(self._renew.sha, 3, keys.run(request_id), keys.account_slots(account), keys.ACTIVE_ACCOUNTS,
                         request_id, dumps(worker), lease_ms, account)

    def load_renewal(self) -> None:
        """Load :meth:`renew_slots`'s script into Redis: a beat raised NoScriptError (Redis restarted or flushed)."""
        self.redis.script_load(RENEW_SLOT)

    def add_chunks(self, request_id: str, chunks: list[tuple[str, Any, int]], pipe: Any = None) -> None:
        """Append emitted chunks, each ``(type, content, index)`` and numbered on from the last, to the run's stream.

        Written again (an answer Redis lost), or late (a stale write landing after its retry), a chunk the stream
        holds already is not added twice (``APPEND_CHUNKS``); a run that has ended takes none.
        """
        self.add_output(request_id, chunks, [], pipe=pipe)

    def add_output(self, request_id: str, chunks: list[tuple[str, Any, int]],
                   lines: list[tuple[int, int, dict[str, Any], bool]], pipe: Any = None) -> None:
        """Append emitted chunks (as :meth:`add_chunks`) and log lines in one step: each line ``(index, after, line,
        cut)``, numbered on from the last, ``after`` the number of chunks the run emitted before it, ``cut`` for the
        line that says the log was cut.

        A line is added once, as a chunk is, and only while the run is running (``APPEND_OUTPUT``). Without lines,
        the write is the chunks' own (``APPEND_CHUNKS``), as it was before log lines were live.
        """
        stored = [dumps({"type": chunk_type, "content": content, "index": index})
                  for chunk_type, content, index in chunks]
        if not lines:
            if chunks:
                self._append_chunks(keys=[keys.run_events(request_id)], args=[chunks[0][2], self.ttl_ms, *stored],
                                    client=pipe)
            return
        self._append_output(
            keys=[keys.run_events(request_id), keys.run_logs(request_id), keys.run(request_id)],
            args=[chunks[0][2] if chunks else 0, len(chunks), lines[0][0], self.ttl_ms, *stored,
                  *(item for _, after, line, cut in lines for item in (after, int(cut), dumps(line)))],
            client=pipe)

    def request_cancel(self, request_id: str) -> None:
        """Ask the worker running ``request_id`` to stop it (it checks within its heartbeat)."""
        self.redis.set(keys.run_cancel(request_id), 1, px=self.ttl_ms)

    def finish(self, pipe: redis.client.Pipeline, request_id: str, end: RunEnd, fields: dict[str, Any],
               claim: str, counters: Sequence[str] = (), tokens: Sequence[tuple[str, int]] = ()) -> None:
        """Queue the end of a run claimed under ``claim``: the record's final ``fields``, the ``done`` event, the
        lease gone, ``runs:<status>`` and each of ``counters`` counted in the metrics, its account's slot back
        and its usage counted, ``tokens`` (flowpool.quotas.token_increments) too. Written only while the run
        is still running under that claim (:data:`~flowpool.run_scripts.FINISH`): the pipeline's answer for it is
        1, or 0 when the run had been ended already (lost) and keeps that end (and nothing is counted)."""
        now = time.time()
        flat = [item for pair in encode({"status": end.status, "finished_at": now, **fields}).items()
                for item in pair]
        self._finish(keys=[keys.run(request_id), keys.run_events(request_id), keys.run_lease(request_id),
                           keys.RUNS_ACTIVE, keys.METRICS, keys.run_logs(request_id), *end_keys(request_id)],
                     args=[request_id, dumps(claim), dumps(end.to_message()), self.ttl_ms,
                           dumps([f"runs:{end.status}", *counters]), self._tail_ms, dumps(now), dumps(tokens),
                           *end_args(day_of(now), self.usage_seconds, self.hard_grace_seconds), *flat],
                     client=pipe)

    def put_reply(self, pipe: redis.client.Pipeline, request_id: str, sealed: str, seconds: int) -> None:
        """Queue the write of the output of a run whose stream keeps it redacted, sealed for its callers' secrets,
        kept ``seconds`` (as long as a repeat of the request with its Idempotency-Key may come to read it)."""
        pipe.set(keys.run_reply(request_id), sealed, ex=seconds)

    def take_reply(self, request_id: str, end: RunEnd, box: SecretBox | None) -> RunEnd:
        """``end`` with its clear output, for a caller holding the secrets it was sealed for.

        Every caller of the run (its own and those that joined it) opens the
        same sealed reply with its own secrets; anyone else, or a caller after
        the reply expired, keeps the redacted end.
        """
        if not end.reply or box is None:
            return end
        sealed = self.redis.get(keys.run_reply(request_id))
        if sealed is None:
            return end
        try:
            return replace(end, **box.open(sealed.decode()), reply=False)
        except InvalidToken:
            return end

    def abandon(self, request_id: str, expected: RunStatus, error: RunError, version: str | None,
                force: bool = False, notify: bool = True) -> bool:
        """End a run stuck in ``expected`` state with ``error``; False if it moved on meanwhile.

        A running run with a live lease is left alone unless ``force`` (it is overdue). The log lines it sent
        so far go into its record, as its end would have written them; its account's slot comes back and the
        run is counted in its usage (no tokens; compute capped at its hard limit). Its webhook, if it has one,
        is made due unless not ``notify`` (a run withdrawn because it could not be sent: its caller answers
        with the error and forgets the webhook).
        """
        status = RunStatus.for_error(error) if expected is RunStatus.RUNNING else RunStatus.EXPIRED
        end = RunEnd(status=status.value, version=version, error=error.to_dict())
        now = time.time()
        return bool(self._abandon(
            keys=[keys.run(request_id), keys.run_lease(request_id), keys.run_events(request_id), keys.RUNS_ACTIVE,
                  keys.run_logs(request_id), keys.METRICS, *end_keys(request_id)],
            args=[expected.value, status.value, dumps(now), dumps(error.to_dict()), dumps(end.to_message()),
                  self.ttl_ms, "1" if force else "0", request_id, self._tail_ms, "1" if notify else "0",
                  *end_args(day_of(now), self.usage_seconds, self.hard_grace_seconds)]))

    @property
    def _tail_ms(self) -> int:
        return min(self.ttl_ms, LOG_TAIL_SECONDS * 1000)

    # Reading

    def get(self, request_id: str) -> RunRecord | None:
        """The run's record, or None."""
        return RunRecord.from_fields(self.redis.hgetall(keys.run(request_id)))

    def count_cache_hit(self) -> None:
        """Count a cache hit answered outside :meth:`begin` (a cache with a Redis of its own)."""
        self.redis.hincrby(keys.METRICS, "cache_hits", 1)

    def end_of(self, request_id: str) -> RunEnd | None:
        """How the run ended, or None while it is still queued or running (or unknown)."""
        return self.outcome(request_id)[1]

    def outcome(self, request_id: str) -> tuple[RunRecord | None, RunEnd | None]:
        """The run's record and how it ended (None while it is still queued or running), in one round trip.

        The end is its stream's ``done`` event; a cache hit's record, which
        has no stream, gives its end itself.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(keys.run_events(request_id), count=1)
        pipe.hgetall(keys.run(request_id))
        last, raw = pipe.execute()
        record = RunRecord.from_fields(raw)
        if last and last[0][1].get(b"kind") == b"done":
            return record, RunEnd.from_message(json.loads(last[0][1][b"data"]))
        if record is None or record.status in (RunStatus.QUEUED.value, RunStatus.RUNNING.value):
            return record, None
        output = record.output
        return record, RunEnd(status=record.status, version=record.version, usage=record.usage, output=output,
                              content=output if isinstance(output, str) else dumps(output), error=record.error)

    def get_many(self, request_ids: list[str]) -> list[RunRecord | None]:
        """Several records in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hgetall(keys.run(request_id))
        return [RunRecord.from_fields(raw) for raw in pipe.execute()]

    def chunks(self, request_id: str) -> list[dict[str, Any]]:
        """The chunks the run emitted, in order."""
        return chunks_of(self.redis.xrange(keys.run_events(request_id)))

    def so_far(self, request_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
        """What a running run has sent so far, as its record will keep it: its chunks, its log lines, and whether
        its log was cut at its size limit (the last line then says so). One round trip, one snapshot (MULTI):
        no line shows without the chunks emitted before it."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xrange(keys.run_events(request_id))
        pipe.xrange(keys.run_logs(request_id))
        entries, lines = pipe.execute()
        cut = bool(lines) and lines[-1][1][b"cut"] == b"1"
        return chunks_of(entries), [json.loads(fields[b"data"]) for _, fields in lines], cut

    def wait(self, request_id: str, queue_wait: float, run_seconds: float, poll: float = 1.0) -> RunEnd:
        """Block until the run's ``done`` event (see :meth:`events`)."""
        for _, kind, data in self.events(request_id, queue_wait, run_seconds, poll=poll, chunks=False):
            if kind == "done":
                return data
        raise AssertionError("events() ends with done")

    def events(self, request_id: str, queue_wait: float, run_seconds: float, poll: float = 1.0,
               chunks: bool = True, after: str = "0-0", keepalive: float | None = None,
               logs: bool = False) -> Iterator[tuple[str, str, Any]]:
        """The run's chunks as they come (``(entry_id, "chunk", data)``), then ``(entry_id, "done", RunEnd)``.

        ``after`` is a stream entry id (an SSE Last-Event-ID) to resume from.
        With ``logs``, its log lines too (``(event_id, "log", line)``, the
        line with its ``index``), in the order the run sent them and the
        chunks, read from the log stream in the same XREAD; each event's id is
        then ``<events entry id>.<log entry id>``, the two streams' cursors,
        and so is ``after``. Without, the log stream is not read at all.
        With ``keepalive``, ``("", "ping", {})`` comes after that many seconds
        without an event, so a streaming caller can keep its connection open.

        Ends the run itself if it cannot finish: ``queue_wait`` bounds the
        time before a worker claims it (then RunNotStarted, a 503, and the run
        is dropped); ``run_seconds`` bounds the time after the claim (then the
        worker is taken for lost), as does a lease gone for longer than
        ``lease_grace_seconds``. Nothing is consumed: any number of callers
        can follow one run.

        A Redis that does not answer is asked again until ``queue_wait +
        run_seconds + outage_seconds`` have passed; then OutcomeUnavailable,
        naming the run, which may still have finished.
        """
        stream, lines = keys.run_events(request_id), keys.run_logs(request_id) if logs else None
        events_after, _, lines_after = after.partition(".")
        cursors = {stream: events_after, lines: lines_after or "0-0"} if lines else {stream: after}
        begun = time.monotonic()
        started_by = begun + queue_wait
        give_up_at = started_by + run_seconds + self.outage_seconds
        run_deadline: float | None = None
        leaseless_since: float | None = None
        quiet_since = begun

        def unless_unreachable(call: Callable[[], T], what: str) -> T:
            try:
                return patiently(call, give_up_at, f"run {request_id}: {what}")
            except UNREACHABLE as exc:
                raise OutcomeUnavailable(
                    f"Redis did not answer ({exc}) until past the run's deadline, so its outcome is unknown: it may "
                    "still have finished; look it up by its request_id", request_id=request_id) from exc

        while True:
            if lines is None:
                reply = unless_unreachable(lambda: self.redis.xread(cursors, block=int(poll * 1000), count=READ),
                                           "reading its events")
            else:
                # A blocked XREAD is answered with what woke it, the new entries of one of the streams only; so it
                # only waits here, and the read after it sees both streams as they are at one moment.
                reply = unless_unreachable(lambda: self.redis.xread(cursors, block=int(poll * 1000), count=1),
                                           "waiting for its events")
                if reply:
                    reply = unless_unreachable(lambda: self.redis.xread(cursors, count=READ), "reading its events")
            for key, entry_id, fields in in_order(reply or (), stream, lines):
                cursors[key] = entry_id.decode()
                event_id = ".".join(cursors.values())
                if key == lines:
                    yield event_id, "log", {**json.loads(fields[b"data"]), "index": int(fields[b"index"])}
                elif fields.get(b"kind") == b"done":
                    yield event_id, "done", RunEnd.from_message(json.loads(fields[b"data"]))
                    return
                elif chunks:
                    yield event_id, "chunk", json.loads(fields[b"data"])
            if reply:
                quiet_since = time.monotonic()
                continue
            if keepalive is not None and time.monotonic() - quiet_since >= keepalive:
                quiet_since = time.monotonic()
                yield "", "ping", {}
            status, has_lease, version = unless_unreachable(lambda: self._state(request_id), "reading its state")
            now = time.monotonic()
            if status == RunStatus.QUEUED.value and now > started_by:
                error = RunNotStarted(f"no worker started the run within {queue_wait:g}s; it was dropped")
                if unless_unreachable(lambda: self.abandon(request_id, RunStatus.QUEUED, error, version), "ending it"):
                    raise error
            elif status == RunStatus.RUNNING.value:
                run_deadline = run_deadline or now + run_seconds
                # With a live lease its worker is there, maybe still writing its end through an outage.
                overdue = now > run_deadline + (self.outage_seconds if has_lease else 0)
                if has_lease:
                    leaseless_since = None
                elif leaseless_since is None:
                    leaseless_since = now
                lapsed = leaseless_since is not None and now - leaseless_since >= self.lease_grace_seconds
                if lapsed or overdue:
                    lost = WorkerLost("the worker running this request stopped answering; the run was lost")
                    # Overdue with a live lease: the worker is up but the run is stuck;
                    # without force it would be waited on for as long as the lease is kept.
                    # Not ended here (it ended meanwhile): its done event comes next.
                    if unless_unreachable(lambda: self.abandon(request_id, RunStatus.RUNNING, lost, version,
                                                               force=overdue), "ending it"):
                        raise lost
            elif status is None and now > give_up_at:
                raise OutcomeUnavailable("the run's record is gone from Redis (restarted without its data?), so its "
                                         "outcome is unknown", request_id=request_id)

    def reap(self, margin: float, every: float, limit: int = 100) -> int:
        """End the runs still unfinished ``margin`` seconds past their deadline; how many it ended.

        A queued one becomes ``expired`` (RunNotStarted), a running one
        ``lost`` (WorkerLost), each with the reason in its error. One process
        in all does it per ``every`` seconds (a lock with that TTL), so every
        worker and API process may call it as often as it likes.
        """
        if not self.redis.set(keys.RUNS_REAPER, "1", nx=True, px=max(1, int(every * 1000))):
            return 0
        overdue = self.redis.zrangebyscore(keys.RUNS_ACTIVE, "-inf", time.time() - margin, start=0, num=limit)
        ended = 0
        for member in overdue:
            request_id = member.decode()
            status, _, version = self._state(request_id)
            if status == RunStatus.QUEUED.value:
                error: RunError = RunNotStarted(
                    f"no worker started the run and nobody waited for it any more; it expired {margin:g}s past its "
                    "deadline")
                ended += self.abandon(request_id, RunStatus.QUEUED, error, version)
            elif status == RunStatus.RUNNING.value:
                error = WorkerLost(
                    f"the run had no end {margin:g}s past its hard time limit: its worker died or could not write "
                    "its outcome to Redis; the run was lost")
                ended += self.abandon(request_id, RunStatus.RUNNING, error, version, force=True)
            else:  # it ended meanwhile, or its record is gone
                self.redis.zrem(keys.RUNS_ACTIVE, request_id)
                continue
            log.warning("run %s: %s", request_id, error)
        return ended

    def _state(self, request_id: str) -> tuple[str | None, bool, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(keys.run(request_id), "status", "version")
        pipe.exists(keys.run_lease(request_id))
        (status, version), lease = pipe.execute()
        return status.decode() if status else None, bool(lease), json.loads(version) if version else None

