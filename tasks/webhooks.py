"""Delivering webhooks: each worker POSTs the ends of runs whose webhook is due, signed, through the egress guard.

A dispatcher thread claims due webhooks (:meth:`WebhookStore.claim`, a lease)
as delivery threads free up, and each delivery records its attempt:

- a 2xx answer: ``delivered``;
- the egress guard refuses the address (checked on the URL, then again at
  connect time, so a name that turned private is caught): ``refused``, never
  tried again;
- anything else (a 3xx, since redirects are not followed; a 4xx or 5xx; a
  timeout; a refused connection; a name that does not resolve): tried again
  with backoff (:func:`~flowpool.webhooks.next_attempt_at`) until
  FLOWPOOL_WEBHOOK_RETRY_SECONDS after the first attempt, then ``failed``.

The body is the run's end as its record keeps it (its output redacted of the
request's secrets), as JSON::

    {"type": "run.completed", "request_id", "workflow", "version", "status", "session_id", "output", "error",
     "usage", "finished_at"}

signed with the account's webhook secret (flowpool.signing), made on first use.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import redis
import requests

import flowpool
from flowpool.egress import EgressDenied, EgressPolicy, guarded_session
from flowpool.registry import Accounts
from flowpool.run import RunRecord, RunStatus
from flowpool.runs import RunStore
from flowpool.settings import Settings
from flowpool.signing import HEADER, sign
from flowpool.webhooks import Outcome, Webhook, WebhookStore, next_attempt_at

__all__ = ["WebhookDeliverer", "origin_of", "payload_of"]

log = logging.getLogger("flowpool.webhooks")

# A run whose webhook came due before its end could be read (it should not happen): looked at again this soon.
_NOT_ENDED_SECONDS = 1.0


def payload_of(record: RunRecord) -> dict[str, Any]:
    """What a webhook POSTs for the run of ``record``."""
    return {"type": "run.completed", "request_id": record.request_id, "workflow": record.workflow,
            "version": record.version, "status": record.status, "session_id": record.session_id,
            "output": record.output, "error": record.error, "usage": record.usage,
            "finished_at": record.finished_at}


class WebhookDeliverer:
    """Claims due webhooks and POSTs them, ``threads`` at a time; started and stopped with the worker."""

    def __init__(self, store: WebhookStore, runs: RunStore, accounts: Accounts, settings: Settings,
                 policy: EgressPolicy | None = None, threads: int = 4, poll_seconds: float = 0.25) -> None:
        self.store = store
        self.runs = runs
        self.accounts = accounts
        self.policy = policy or EgressPolicy(settings.egress_allow)
        self.timeout = settings.webhook_timeout_seconds
        self.retry_seconds = settings.webhook_retry_seconds
        # Past the longest a delivery can take (connect, then the answer's first byte): another deliverer takes
        # the webhook again only when this one's worker died holding it.
        self.lease_seconds = 2 * self.timeout + 5
        self.threads = threads
        self.poll_seconds = poll_seconds
        self._session = guarded_session(self.policy)
        self._stop = threading.Event()
        self._free = threading.Semaphore(threads)
        self._pool: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="flowpool-webhook")
        self._dispatcher = threading.Thread(target=self._dispatch, name="flowpool-webhooks", daemon=True)
        self._dispatcher.start()

    def stop(self) -> None:
        """Stop claiming; deliveries under way finish (each bounded by the timeout), their outcomes recorded."""
        self._stop.set()
        if self._dispatcher is not None and self._dispatcher.is_alive():
            self._dispatcher.join(5)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._session.close()

    def _dispatch(self) -> None:
        failing = False
        while not self._stop.is_set():
            if not self._free.acquire(timeout=self.poll_seconds):  # every delivery thread busy
                continue
            try:
                ids = self.store.claim(self.lease_seconds, limit=1)
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("webhooks: could not claim due webhooks: %s", exc)
                failing, ids = True, []
            if not ids:
                self._free.release()
                self._stop.wait(self.poll_seconds)
                continue
            assert self._pool is not None
            try:
                self._pool.submit(self._deliver_then_free, ids[0])
            except RuntimeError:  # the pool is shutting down: the lease lapses and another worker takes it
                self._free.release()
                return

    def _deliver_then_free(self, request_id: str) -> None:
        try:
            self.deliver(request_id)
        except Exception:  # a Redis error recording it: the lease lapses and the webhook is tried again
            log.exception("webhook of run %s: delivery failed", request_id)
        finally:
            self._free.release()

    def deliver_due(self, limit: int = 100) -> int:
        """Claim and deliver what is due now, one after the other, in this thread, up to ``limit``; how many were
        claimed. (A claim takes one webhook of each account: it claims again till nothing more is due.)"""
        claimed = 0
        while claimed < limit:
            ids = self.store.claim(self.lease_seconds, limit=limit - claimed)
            if not ids:
                break
            for request_id in ids:
                self.deliver(request_id)
            claimed += len(ids)
        return claimed

    def deliver(self, request_id: str) -> Outcome | None:
        """POST one claimed webhook and record the attempt; its outcome (None: nothing was attempted)."""
        webhook = self.store.get(request_id)
        if webhook is None or webhook.status != "pending":  # expired with its run, or recorded by another
            self.store.drop(request_id)
            return None
        record = self.runs.get(request_id)
        if record is not None and record.status in (RunStatus.QUEUED.value, RunStatus.RUNNING.value):
            self.store.defer(request_id, time.time() + _NOT_ENDED_SECONDS)
            return None
        started = time.time()
        if record is None:
            attempt = {"at": started, "error": "the run's record is gone (expired), so there is nothing to send",
                       "ms": 0.0}
            self.store.record(request_id, attempt, "failed")
            return "failed"
        attempt, outcome = self._post(webhook, record, started)
        next_at = None
        if outcome == "pending":
            now = time.time()
            next_at = next_attempt_at(webhook.tries + 1, webhook.first_at or started, now, self.retry_seconds)
            if next_at is None:
                outcome = "failed"
        self.store.record(request_id, attempt, outcome, next_at, now=started)
        if outcome != "delivered":  # the URL's origin only: its path and query may hold a token (Slack-style)
            log.info("webhook of run %s to %s: %s (%s)", request_id, origin_of(webhook.url), outcome,
                     attempt.get("status_code") or attempt.get("error"))
        return outcome

    def _post(self, webhook: Webhook, record: RunRecord, started: float) -> tuple[dict[str, Any], Outcome]:
        """One POST of the run's end: the attempt as recorded, and delivered, refused or pending (try again)."""
        body = json.dumps(payload_of(record), separators=(",", ":"), ensure_ascii=False).encode()
        secret = self.accounts.webhook_secret(webhook.account)
        headers = {"Content-Type": "application/json", HEADER: sign(secret, body, int(started)),
                   "X-Flowpool-Webhook-Id": webhook.request_id,
                   "User-Agent": f"flowpool-webhooks/{flowpool.__version__}"}
        clock = time.monotonic()
        attempt: dict[str, Any] = {"at": round(started, 3)}
        try:
            self.policy.check_url(webhook.url)  # a clear reason before connecting; the connection checks again
            with self._session.post(webhook.url, data=body, headers=headers, allow_redirects=False, stream=True,
                                    timeout=(min(5.0, self.timeout), self.timeout)) as response:
                attempt["status_code"] = response.status_code
            outcome: Outcome = "delivered" if 200 <= response.status_code < 300 else "pending"
        except EgressDenied as exc:
            attempt["error"], outcome = _scrubbed(str(exc), webhook.url), _refused_or_retried(exc)
        except requests.RequestException as exc:
            cause = exc.__context__
            while cause is not None and not isinstance(cause, EgressDenied):
                cause = cause.__context__
            if isinstance(cause, EgressDenied):
                attempt["error"], outcome = _scrubbed(str(cause), webhook.url), _refused_or_retried(cause)
            else:
                attempt["error"], outcome = _short_reason(exc), "pending"
        attempt["ms"] = round((time.monotonic() - clock) * 1000, 3)
        return attempt, outcome


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a webhook URL: what logs and recorded attempts name, never its path or query,
    which may carry a token (a Slack-style URL)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(a URL that does not parse)"
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or ""
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def _scrubbed(message: str, url: str) -> str:
    """The egress guard's reason with the URL, where it names it, cut to its origin."""
    return message.replace(url, origin_of(url))[:500]


def _short_reason(exc: requests.RequestException) -> str:
    """The error's class and a short reason, not its message: requests' messages carry the URL's path (``Max
    retries exceeded with url: /hooks/T0/B0/secret``). The reason is that of the socket error under it, if any."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 10:  # the first OSError with a reason, down the chain of causes
        if isinstance(cause, OSError) and not isinstance(cause, requests.RequestException) and cause.strerror:
            return f"{type(exc).__name__}: {cause.strerror}"[:200]
        reason = getattr(cause, "reason", None)  # urllib3's MaxRetryError keeps its cause here
        cause = reason if isinstance(reason, BaseException) else (cause.__cause__ or cause.__context__)
        seen += 1
    return type(exc).__name__


def _refused_or_retried(exc: EgressDenied) -> Outcome:
    """A name that did not resolve may resolve later (tried again); an address the guard refuses stays refused."""
    return "pending" if isinstance(exc.__cause__, socket.gaierror) else "refused"
