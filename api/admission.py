"""Admission of one invocation: what to run, whether the cache answers, and handing the run to the workers.

:func:`admit` resolves the workflow, checks the input, works out the cache
key and, in one Redis round trip (:meth:`RunStore.begin`), either finds the
answer cached, joins an identical run in flight, or queues a run record. A
queued run's :class:`RunJob` is built here, once; :func:`submit` sends it to
the workers by the task's name. Neither touches the HTTP request: the view
parses, admits, and answers or streams.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import redis

from flowpool import keys
from flowpool.connections import UNREACHABLE, patiently
from flowpool.errors import (FlowpoolError, IdempotencyKeyReused, OutcomeUnavailable, PayloadTooLarge, RequestError,
                             RunNotStarted, Unavailable)
from flowpool.jsonsafe import canonical_json
from flowpool.queues import broker_queue
from flowpool.quotas import Quota
from flowpool.registry import Account, ResolvedWorkflow, check_invocation_input
from flowpool.run import (CachePlan, RunEnd, RunJob, RunRecord, RunStatus, dumps, redact, secret_redactions,
                          secret_spellings)
from flowpool.sealing import InvalidToken, SecretBox
from flowpool.tasks.app import RUN_TASK

from .models import InvokeRequest, parse_model
from .services import Services

__all__ = ["Admission", "admit", "discard_quietly", "submit"]

log = logging.getLogger("flowpool.api")

# How often admission resolves again when the workflow changes under it before giving up with a 503.
_STALE_TRIES = 3


@dataclass(frozen=True)
class Admission:
    """What admitting one invocation decided: answered from the cache, joined a run in flight, or queued one."""

    verdict: Literal["hit", "join", "queued", "replay"]
    # The run the answer follows and names: this request's; for a join the leader's; for a replay the
    # run its Idempotency-Key first named.
    request_id: str
    session_id: str
    run_seconds: float  # how long a waiter gives the run once a worker has claimed it
    end: RunEnd | None = None  # a hit's cached end
    chunks: list[dict[str, Any]] = field(default_factory=list)  # a hit's cached chunks
    job: RunJob | None = None  # a queued run's job, for submit
    box: SecretBox | None = None  # opens an output sealed for this request's secrets (flowpool.sealing)
    lane: int = 0  # a queued run's fair-share lane (flowpool.quotas): 0 first

    @property
    def cache_header(self) -> str:
        """The ``X-Cache`` value: a run of its own (or a replay of one) is a miss; a cached answer or a joined run is
        a hit."""
        return "MISS" if self.verdict in ("queued", "replay") else "HIT"


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def _check_size(body: InvokeRequest, limit: int) -> None:
    size = len(json.dumps(body.input)) + len(json.dumps([m.model_dump() for m in body.messages or []]))
    if size > limit:
        raise PayloadTooLarge(f"input and messages are {size} bytes as JSON, over the limit of {limit}")


def _fingerprint(svc: Services, body: InvokeRequest, webhook_url: str | None = None) -> str:
    """What an Idempotency-Key is checked against: the hash of everything the request asks, secrets keyed.

    ``stream`` and ``cache`` are left out: a retry may ask for the same run either way. A ``webhook_url`` is
    in (the key names one run, and its webhook is that run's): the same key with another URL, or with one where
    the first had none, is a conflict. Left out when there is none, so a request without one keeps the
    fingerprint it had before webhooks.
    """
    material = body.model_dump(include={"model", "input", "messages", "session_id", "metadata", "max_tokens",
                                        "temperature"})
    material["secrets"] = svc.cache.server_key.mac(body.secrets) if body.secrets else ""
    if webhook_url is not None:
        material["webhook_url"] = webhook_url
    return hashlib.sha256(canonical_json(material)).hexdigest()


def _replay(svc: Services, account: Account, body: InvokeRequest, first: str, run_seconds: float) -> Admission:
    """The answer of a request repeating an Idempotency-Key: the first run's, ended or still going."""
    record, end = svc.runs.outcome(first)
    session_id = (record.session_id if record else None) or body.session_id or ""
    box = svc.sealer.box(account.id, body.secrets)
    if end is None:  # still going: followed like a joined run
        return Admission("replay", first, session_id, run_seconds, box=box)
    return Admission("replay", first, session_id, run_seconds, end=svc.runs.take_reply(first, end, box),
                     chunks=svc.runs.chunks(first) if body.stream else [])


def admit(svc: Services, account: Account, body: InvokeRequest, idempotency_key: str | None = None,
          webhook_url: str | None = None, workflow: ResolvedWorkflow | None = None) -> Admission:
    """Decide how ``body`` is answered; a queued run is recorded and its job built, not yet sent.

    With ``idempotency_key``, a request repeating it within the window gets
    the first request's run (:meth:`RunStore.begin`), whatever its ``cache``.
    The account's quotas are checked in the same step: over one, QuotaExceeded
    (a 429) and nothing was written. With ``webhook_url`` (checked by the caller)
    the run gets a webhook, due when it ends (at once for a cache hit); such a
    request never joins another's run, whose end it could not be told of.
    ``workflow``: what ``body.model`` resolves to, when the caller has it
    before it is stored (a preview, :mod:`flowpool.registry.previews`).
    """
    if body.messages is None and body.input is None:
        raise RequestError("send 'messages', 'input' or both", param="input")
    settings = svc.settings
    ref, pinned = parse_model(body.model)
    request_id = _new_id("req_")
    session_id = body.session_id or _new_id("sess_")
    messages = [m.model_dump(exclude_none=True) for m in body.messages] if body.messages else None
    request = body.model_dump(include={"input", "max_tokens", "temperature", "metadata"})
    request["messages"] = messages

    if workflow is None:
        workflow = svc.resolve(account.id, ref, pinned)
    # Before anything is written (run record, single-flight lock, Idempotency-Key): a refused request leaves
    # nothing behind that a retry would replay.
    _check_served(svc, workflow.queue)
    _check_size(body, settings.max_input_bytes)
    # Only for a request within the size limit: the copy is a walk over all of it and a dump of it as JSON.
    sent = _as_recorded(body.input, messages, body.secrets or {}, settings.run_record_input_bytes)
    idempotency = None
    if idempotency_key is not None:
        idempotency = (keys.idempotency(account.id, hashlib.sha256(idempotency_key.encode()).hexdigest()),
                       _fingerprint(svc, body, webhook_url), settings.idempotency_window)
    if webhook_url is not None:
        svc.webhooks.prepare(request_id, account.id, webhook_url)
    join = webhook_url is None
    try:
        for _ in range(_STALE_TRIES):  # a workflow changed under the request is resolved and checked again
            check_invocation_input(workflow.input_schema, body.input)
            soft = settings.clamp_timeout(workflow.timeout_seconds)
            run_seconds = soft + settings.run_deadline_slack
            ttl = workflow.cache_ttl_seconds if workflow.cache_ttl_seconds is not None \
                else settings.default_cache_ttl_seconds
            cache_key = None
            if body.cache and ttl > 0:
                cache_key = svc.cache.key(account.id, workflow.content_hash, workflow.config_hash, request,
                                          body.secrets)
            queued = RunRecord(request_id=request_id, account=account.id, workflow=workflow.ref,
                               status=RunStatus.QUEUED, version=workflow.version, session_id=session_id,
                               cache_hit=False, queued_at=time.time(), timeout_seconds=soft, metadata=body.metadata,
                               input=sent[0], messages=sent[1])
            lock_seconds = settings.queue_wait_seconds + run_seconds
            slots = svc.queue_slots(workflow.queue) if settings.fair_share else 0  # what fair share divides
            quota = Quota.for_request(settings, account.id, workflow.ref, slots)
            if cache_key and svc.cache.separate:
                state, found = _begin_with_own_cache(svc, queued, cache_key, lock_seconds, workflow.rev,
                                                     idempotency, quota, join)
            else:
                state, found = svc.runs.begin(
                    queued, cache_keys=svc.cache.redis_keys(account.id, cache_key) if cache_key else None,
                    lock_seconds=lock_seconds, rev=workflow.rev, idempotency=idempotency, quota=quota, join=join)
            if state != "stale":
                break
            workflow = svc.resolve(account.id, ref, pinned, fresh=True)
        else:
            raise Unavailable(f"workflow {ref!r} changed {_STALE_TRIES} times while this request started; "
                              "try again")
    except BaseException:
        if webhook_url is not None:
            discard_quietly(svc, request_id)
        raise
    if webhook_url is not None and state in ("conflict", "replay"):
        discard_quietly(svc, request_id)  # the run the key named is the first request's, its webhook too

    if state == "conflict":
        raise IdempotencyKeyReused(f"this Idempotency-Key was first sent with a different request (run {found}); "
                                   "send a new key for a new request", param="Idempotency-Key")
    if state == "replay":
        return _replay(svc, account, body, found, run_seconds)
    box = svc.sealer.box(account.id, body.secrets)
    if state in ("hit", "hit-unrecorded"):
        if state == "hit-unrecorded":
            svc.runs.record(_hit_record(queued, found))
        if webhook_url is not None:
            svc.webhooks.due_now(request_id)  # its run has ended already
        end = RunEnd(status=RunStatus.SUCCEEDED.value, version=found.get("version"), usage=found.get("usage"),
                     **_clear_output(found, box))
        return Admission("hit", request_id, session_id, run_seconds, end=end, chunks=found.get("chunks") or [])
    if state == "join":
        return Admission("join", found, session_id, run_seconds, box=box)
    job = RunJob(
        request_id=request_id, account=workflow.account_id, workflow=workflow.ref, version=workflow.version,
        content_hash=workflow.content_hash, soft_seconds=soft, session_id=session_id, input=body.input,
        messages=messages or [], secrets=body.secrets or {}, metadata=body.metadata or {},
        params={"max_tokens": body.max_tokens, "temperature": body.temperature, "stream": body.stream},
        env=workflow.env, output_schema=workflow.output_schema, application=workflow.application,
        limits=workflow.limits, cache=CachePlan(cache_key, ttl) if cache_key else None, queue=workflow.queue)
    return Admission("queued", request_id, session_id, run_seconds, job=job, box=box, lane=found or 0)


def _as_recorded(input: Any, messages: list[dict[str, Any]] | None, secrets: dict[str, str],
                 limit: int) -> tuple[Any, Any]:
    """The request's ``input`` and ``messages`` as its run record keeps them: redacted of its secrets (as a run's
    output is), each one over ``limit`` bytes of compact JSON replaced by a note of its size."""
    replacements = secret_redactions(secret_spellings(secrets))
    kept = []
    for value in (input, messages):
        value = redact(value, replacements)
        size = len(dumps(value).encode()) if value is not None else 0
        kept.append({"omitted": f"{size} bytes, over the record's limit of {limit}"} if size > limit else value)
    return kept[0], kept[1]


def _hit_record(queued: RunRecord, entry: dict[str, Any]) -> RunRecord:
    """The run record of a request answered by the cache ``entry``: ``queued`` with what the entry holds."""
    now = time.time()
    return replace(queued, status=RunStatus.SUCCEEDED, version=entry.get("version"), cache_hit=True,
                   origin_request_id=entry.get("request_id"), queued_at=now, started_at=now, finished_at=now,
                   output=entry.get("output"), usage=entry.get("usage"), chunk_count=len(entry.get("chunks") or ()))


def _begin_with_own_cache(svc: Services, queued: RunRecord, cache_key: str, lock_seconds: float, rev: str,
                          idempotency: tuple[str, str, float] | None, quota: Quota | None = None,
                          join: bool = True) -> tuple[str, Any]:
    """:meth:`RunStore.begin` where the cache has a Redis of its own: the cache first, then the run's record.

    A hit is recorded as this request's run (the workflow's revision, the
    Idempotency-Key and the account's rate checked as for a queued run); a
    request that took the single-flight lock and then is not queued (refused
    by a quota, say) gives the lock back. A request with an Idempotency-Key,
    or without ``join``, does not join a run in flight (its key could not name
    that run): it is run on its own. A join counts against the account's rate.
    """
    try:
        cached, found = svc.cache.lookup(queued.account, cache_key, queued.request_id, lock_seconds)
    except UNREACHABLE as exc:  # the cache is an optimisation: without it the request runs
        log.warning("the cache's Redis is unreachable (%s); running the request uncached", exc)
        cached, found = "miss", None
    if cached == "join" and idempotency is None and join:
        if quota is not None:
            svc.runs.take_rate(quota)
        return cached, found
    record = _hit_record(queued, found) if cached == "hit" else queued
    state, first = "failed", None
    try:
        state, first = svc.runs.begin(record, lock_seconds=lock_seconds, rev=rev, idempotency=idempotency,
                                      quota=quota)
    finally:
        if cached == "lead" and state != "queued":
            _release_quietly(svc, queued.account, cache_key, queued.request_id)
    if state == "queued" and cached == "hit":
        svc.runs.count_cache_hit()
        return "hit", found
    return state, first


def discard_quietly(svc: Services, request_id: str) -> None:
    """Forget the webhook of a request that was not admitted, or of a run that will not run; one Redis does not
    forget now lapses with its TTL (its run's end, written as never started, may then still be sent)."""
    try:
        svc.webhooks.discard(request_id)
    except redis.RedisError:
        pass


def _release_quietly(svc: Services, account_id: str, cache_key: str, request_id: str) -> None:
    """Give back a single-flight lock; one a cache Redis that is away keeps lapses by itself."""
    try:
        svc.cache.release(account_id, cache_key, request_id)
    except UNREACHABLE:
        pass


def _clear_output(entry: dict[str, Any], box: SecretBox | None) -> dict[str, Any]:
    """A cache entry's output and content, opened for this request when sealed for its secrets.

    Only a request holding the same secrets finds such an entry (the cache
    key holds their keyed hash), so one that does not open means the server
    key changed under it: a 503, never the redacted output as an answer.
    """
    sealed = entry.get("sealed")
    if sealed is None:
        return {"output": entry.get("output"), "content": entry.get("content")}
    if box is not None:
        try:
            return box.open(sealed)
        except InvalidToken:
            pass
    raise Unavailable("a cached result could not be opened with this request's secrets; "
                      "send the request with \"cache\": false")


def _check_served(svc: Services, queue: str) -> None:
    """503 at once for a queue no live worker serves, unless an autoscaler starts its workers from zero.

    Runs of an autoscaled queue are queued while it has no worker, and wait up to FLOWPOOL_QUEUE_WAIT_SECONDS
    like any run: their queue length is what starts the first worker.
    """
    if queue not in svc.settings.autoscaled_queue_names and not svc.workers_alive(queue):
        raise Unavailable(f"no flowpool worker serving queue {queue!r} is running; start one with "
                          f"'flowpool worker --queues {queue}'")


def submit(svc: Services, admission: Admission, ready: Callable[[], None] | None = None) -> None:
    """Hand a queued run to the workers; if that fails, the run ends as never started and the error is raised.

    ``ready`` first writes what the run needs and admission did not (a
    preview's workflow): when it fails the run ends so too.

    A publish that failed may still have reached the broker (an answer lost
    to a timeout): unless the run can be ended as never started, the caller
    hears that its outcome is unknown (not safe to retry), never that
    nothing ran.
    """
    job = admission.job
    assert job is not None, "only a queued admission has a job to submit"
    published = False  # whether a message may have reached the broker
    try:
        if ready is not None:
            ready()
        _check_served(svc, job.queue)  # again: its last worker may have gone since admission looked
        try:
            message = job.to_message(svc.sealer)
            published = True
            svc.sender.send(
                RUN_TASK, kwargs={"job": message}, task_id=job.request_id, queue=broker_queue(job.queue),
                expires=svc.settings.queue_wait_seconds,
                # Fair share: the lane BEGIN chose for the run (0 first); a broker without lanes (amqp) keeps FIFO.
                priority=admission.lane if svc.sender.lanes else 0,
                # Keep secrets out of worker logs and task events (Flower).
                argsrepr="()", kwargsrepr=f"{{'job': <run {job.request_id} of {job.workflow}@{job.version}>}}",
            )
        except FlowpoolError:
            raise
        except Exception as exc:
            raise Unavailable(f"the broker did not take the run: {exc}") from exc
    except BaseException as exc:
        if not _withdraw(svc, job, str(exc)) and published:
            raise OutcomeUnavailable(f"the run could not be confirmed as sent to the workers ({exc}), and may run; "
                                     "look it up by its request_id", request_id=job.request_id) from exc
        raise


# How long a run that could not be sent is tried to be ended as never started, while Redis does not answer.
_WITHDRAW_SECONDS = 2.0


def _withdraw(svc: Services, job: RunJob, reason: str) -> bool:
    """End a run that could not be sent as never started, and give back its single-flight lock; whether it ended
    so (False: a worker took it meanwhile, or Redis did not answer)."""
    try:
        # notify=False: its webhook is not made due; the caller forgets it (it answers with the error).
        dropped = patiently(lambda: svc.runs.abandon(job.request_id, RunStatus.QUEUED, RunNotStarted(reason),
                                                     job.version, notify=False),
                            time.monotonic() + _WITHDRAW_SECONDS, f"run {job.request_id}: withdrawing it")
    except redis.RedisError:  # unreachable still, or refusing writes
        return False
    if dropped and job.cache is not None:
        _release_quietly(svc, job.account, job.cache.key, job.request_id)
    return dropped
