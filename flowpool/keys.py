"""Every Redis key flowpool writes, in one place (data lives under ``fp:``)."""
from __future__ import annotations

__all__ = [
    "ACCOUNTS", "METRICS", "RUNS_ACTIVE", "RUNS_REAPER", "SECRET", "WORKERS", "WORKER_POOL",
    "WORKER_SANDBOXES", "queue_workers", "ACTIVE_ACCOUNTS", "WEBHOOKS_DUE", "account_limits", "account_slots",
    "account_rate", "account_usage", "run_webhook",
    "account", "agents", "api_key", "applications", "console_session", "session_runs", "workflows", "workflow",
    "workflow_ids", "versions", "version",
    "version_hashes", "run", "run_cancel", "run_events", "run_calls", "run_lease", "run_logs", "run_reply",
    "workflow_runs", "cache",
    "account_runs", "cache_record", "inflight", "idempotency", "blob", "datastores", "datastore", "datastore_log",
]

PREFIX = "fp:"

ACCOUNTS = PREFIX + "accounts"            # hash: account name -> account id
SECRET = PREFIX + "secret"                # generated key for hashing request secrets
WORKERS = PREFIX + "workers"              # zset: worker name -> last heartbeat (unix time)
# hash: worker name -> JSON {"queues": [names], "slots": n, "running": {queue: n}, "reserved": {queue: n},
# "at": unix time, "draining": bool}, written with each heartbeat: what GET /api/v1/pool and the queue gauges add up.
WORKER_POOL = PREFIX + "workers:pool"
WORKER_SANDBOXES = PREFIX + "workers:sandbox"  # hash: worker name -> JSON {backend, isolation, weaknesses}
METRICS = PREFIX + "metrics"              # hash: counter name -> value, shared by every process
RUNS_ACTIVE = PREFIX + "runs:active"      # zset: request id of each unfinished run -> its deadline (unix time)
RUNS_REAPER = PREFIX + "runs:reaper"      # string with a TTL: held by the one process ending overdue runs now
# zset: account id -> the latest deadline (unix time) of its runs in flight: the accounts sharing the pool now,
# which fair share divides the workers' slots between (flowpool.quotas).
ACTIVE_ACCOUNTS = PREFIX + "accounts:active"
WEBHOOKS_DUE = PREFIX + "webhooks:due"    # zset: request id of each run whose webhook is due -> when (unix time)


def account(account_id: str) -> str:
    """Hash: name, created_at."""
    return f"{PREFIX}acct:{account_id}"


def account_limits(account_id: str) -> str:
    """Hash: the operator's limits for the account (concurrency, rpm, tokens_per_day, compute_seconds_per_day),
    each an integer, 0 for none; a field not set takes the FLOWPOOL_DEFAULT_* setting."""
    return f"{PREFIX}acct:{account_id}:limits"


def account_slots(account_id: str) -> str:
    """Zset: request id of each of the account's runs in flight (queued or running) -> when its slot lapses (unix
    time, on Redis's clock): its concurrency slots, released by the run's end, or at that time by themselves.
    Queued, a run's slot is scored by when its claim could still come (flowpool.quotas); running, by its worker's
    lease, which the worker's heartbeat renews."""
    return f"{PREFIX}a:{account_id}:slots"


def account_rate(account_id: str) -> str:
    """String with a TTL: the account's request-rate state (GCRA's theoretical arrival time, ms)."""
    return f"{PREFIX}a:{account_id}:rate"


def account_usage(account_id: str, day: str) -> str:
    """Hash: the account's usage on one UTC day (``YYYY-MM-DD``); fields in flowpool.usage (USAGE_FIELDS)."""
    return f"{PREFIX}a:{account_id}:usage:{day}"


def api_key(key_hash: str) -> str:
    """String: account id owning the key whose SHA-256 is ``key_hash``."""
    return f"{PREFIX}key:{key_hash}"


def console_session(digest: str) -> str:
    """Hash with a TTL: the console session whose cookie token has the SHA-256 ``digest`` (account, account_name,
    key_hash, csrf, created_at, refreshed_at); the token itself is only in the browser's cookie."""
    return f"{PREFIX}console:{digest}"


def applications(account_id: str) -> str:
    """Hash: application name -> its intents and routes (JSON)."""
    return f"{PREFIX}a:{account_id}:apps"


def agents(account_id: str) -> str:
    """Hash: agent name -> its endpoint or workflow (JSON)."""
    return f"{PREFIX}a:{account_id}:agents"


def session_runs(account_id: str, session_id: str) -> str:
    """Zset: request ids of a session's runs by queue time."""
    return f"{PREFIX}a:{account_id}:session:{session_id}"


def workflows(account_id: str) -> str:
    """Zset: workflow ref names by creation time."""
    return f"{PREFIX}a:{account_id}:wfs"


def workflow(account_id: str, ref: str) -> str:
    """Hash: the workflow's mutable settings (``config``), its active version, ``latest``, ``rev`` and ``id``."""
    return f"{PREFIX}a:{account_id}:wf:{ref}"


def workflow_ids(account_id: str) -> str:
    """String: the account's counter of workflow ids (INCR), each allocated once, when a workflow is first written
    (or, for one written before ids, first read)."""
    return f"{PREFIX}a:{account_id}:wf-ids"


def versions(account_id: str, ref: str) -> str:
    """Zset: version strings by creation order."""
    return f"{PREFIX}a:{account_id}:wf:{ref}:versions"


def version(account_id: str, ref: str, number: str) -> str:
    """Hash: one version: its immutable ``meta`` (content hash, declared constants) and ``script``; while it is a
    draft, also ``draft`` ("1") and its ``settings`` (JSON), both removed when it is activated."""
    return f"{PREFIX}a:{account_id}:wf:{ref}:v:{number}"


def version_hashes(account_id: str, ref: str) -> str:
    """Hash: content hash -> version string, so an identical upload makes no new version."""
    return f"{PREFIX}a:{account_id}:wf:{ref}:hashes"


def workflow_runs(account_id: str, ref: str) -> str:
    """Zset: request ids of the workflow's runs by queue time."""
    return f"{PREFIX}a:{account_id}:wf:{ref}:runs"


def account_runs(account_id: str) -> str:
    """Zset: request ids of all the account's runs by queue time, the newest ``FLOWPOOL_RUNS_PER_ACCOUNT`` kept (an
    id may outlive its record, which expires on its own)."""
    return f"{PREFIX}a:{account_id}:runs"


def run(request_id: str) -> str:
    """Hash: the run record."""
    return f"{PREFIX}run:{request_id}"


def run_events(request_id: str) -> str:
    """Stream: the run's emitted chunks, then one final ``done`` entry."""
    return f"{PREFIX}run:{request_id}:events"


def run_logs(request_id: str) -> str:
    """Stream: a running run's log lines as they come, each with the number of chunks it emitted before it.

    Expires with the record while the run goes; its end (which writes the lines into the record) leaves it a few
    minutes more, for the readers still following it.
    """
    return f"{PREFIX}run:{request_id}:logs"


def run_calls(request_id: str) -> str:
    """List: a running run's model, agent, HTTP and workflow calls as they start and end (flowpool.live_calls), one
    JSON entry each, the calls' own redacted as the record keeps them; merged by call id, the latest entry wins.

    Expires past the run's deadline while it goes; its end (whose record keeps the calls) leaves it the log
    stream's few minutes more.
    """
    return f"{PREFIX}run:{request_id}:calls"


def run_reply(request_id: str) -> str:
    """String with a short TTL: a final output the run's stream keeps only redacted (it carries a secret)."""
    return f"{PREFIX}run:{request_id}:reply"


def run_cancel(request_id: str) -> str:
    """String: set when the caller asked for the run to stop (a streaming caller that went away)."""
    return f"{PREFIX}run:{request_id}:cancel"


def run_webhook(request_id: str) -> str:
    """Hash: the run's webhook: url, account, status, attempts (JSON list), created_at, next_at (flowpool.webhooks)."""
    return f"{PREFIX}run:{request_id}:webhook"


def run_lease(request_id: str) -> str:
    """String with a TTL, kept fresh by the worker while the run is alive."""
    return f"{PREFIX}run:{request_id}:lease"


def cache(account_id: str, cache_key: str) -> str:
    """String: the cached result of a successful run."""
    return f"{PREFIX}a:{account_id}:cache:{cache_key}"


def cache_record(account_id: str, cache_key: str) -> str:
    """Hash: the run-record fields a cache hit copies from the run that filled the entry (same TTL)."""
    return f"{PREFIX}a:{account_id}:cache-record:{cache_key}"


def inflight(account_id: str, cache_key: str) -> str:
    """String: request id of the run computing this cache key right now (single flight)."""
    return f"{PREFIX}a:{account_id}:inflight:{cache_key}"


def idempotency(account_id: str, key_hash: str) -> str:
    """String: ``"<request id> <request fingerprint>"`` of the first request sent with an Idempotency-Key."""
    return f"{PREFIX}a:{account_id}:idem:{key_hash}"


def blob(name: str) -> str:
    """List: the chunks of one blob of the Redis blob store (flowpool.blobs), in order."""
    return f"{PREFIX}blob:{name}"


def datastores(account_id: str) -> str:
    """Zset: the account's datastore names by creation time."""
    return f"{PREFIX}a:{account_id}:dss"


def datastore(account_id: str, name: str) -> str:
    """Hash: a datastore's manifest (spec, generation, head, records, snapshot, created_at, updated_at)."""
    return f"{PREFIX}a:{account_id}:ds:{name}"


def datastore_log(account_id: str, name: str, generation: str) -> str:
    """List: the blob names of one datastore incarnation's batches; batch ``seq`` is entry ``seq - 1``."""
    return f"{PREFIX}a:{account_id}:ds:{name}:{generation}:log"


def queue_workers(queue: str) -> str:
    """Zset: name of each worker consuming ``queue`` -> its last heartbeat (unix time)."""
    return f"{PREFIX}queue:{queue}:workers"
