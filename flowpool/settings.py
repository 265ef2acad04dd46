"""The one settings object: every default declared once, read from ``FLOWPOOL_*`` variables."""
from __future__ import annotations

import os
import tempfile
from typing import Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .queues import check_queue_name

__all__ = ["Settings", "DEFAULT_MAX_JSON_DEPTH", "DEFAULT_MAX_SCRIPT_BYTES", "DEFAULT_REDIS_URL", "WORKFLOW_LIMITS",
           "split_list"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_JSON_DEPTH = 64  # FLOWPOOL_MAX_JSON_DEPTH; also the bound of code that has no Settings at hand
DEFAULT_MAX_SCRIPT_BYTES = 1 << 20  # FLOWPOOL_MAX_SCRIPT_BYTES, likewise


# What a workflow's LIMITS may set -> (the setting holding the default, the setting holding the operator's cap).
WORKFLOW_LIMITS: dict[str, tuple[str, str | None]] = {
    "memory_mb": ("sandbox_memory_mb", "sandbox_memory_mb_cap"),
    "cpu_seconds": ("sandbox_cpu_seconds", None),  # capped by the run's own hard time limit
    "processes": ("sandbox_max_processes", "sandbox_max_processes_cap"),
    "open_files": ("sandbox_max_open_files", "sandbox_max_open_files_cap"),
    "tmp_mb": ("sandbox_tmp_mb", "sandbox_tmp_mb_cap"),
    "result_bytes": ("max_result_bytes", "max_result_bytes_cap"),
    "log_bytes": ("max_log_bytes", "max_log_bytes_cap"),
    "chunks": ("max_chunks", "max_chunks_cap"),
}


def split_list(value: str) -> list[str]:
    """The entries of a comma-separated setting, stripped, empty ones left out."""
    return [part.strip() for part in value.split(",") if part.strip()]


class Settings(BaseSettings):
    """flowpool's configuration. Each field is the variable ``FLOWPOOL_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FLOWPOOL_", extra="ignore", frozen=True)

    # Where things are.
    redis_url: Optional[str] = Field(
        None, description="Redis for the registry, runs and cache. `flowpool dev` starts its own when unset; "
        "the other commands use the Redis of the `flowpool dev` running on FLOWPOOL_DATA_DIR, else "
        f"{DEFAULT_REDIS_URL}.")
    redis_socket_timeout_seconds: float = Field(
        10, ge=2, description="How long one Redis command may wait for its answer (a paused or unreachable server) "
        "before it fails; what carries a run's outcome (the worker's writes, a caller's wait) is then tried again with "
        "backoff, anything else answers 503. Longer than any blocking read flowpool makes (1 s).")
    broker_url: Optional[str] = Field(
        None, description="Celery broker (redis:// or amqp://). Defaults to the Redis URL.")
    cache_redis_url: Optional[str] = Field(
        None, description="A Redis of its own for the result cache, which may evict (maxmemory-policy allkeys-lru) "
        "where the registry's must not. Unset: the cache lives in the registry's Redis, and a lookup shares the "
        "round trip that records the run.")
    blob_url: Optional[str] = Field(
        None, description="Where blobs (accessories, datastore batches and snapshots) live: `s3://bucket/prefix` "
        "for S3-compatible object storage (boto3; credentials from the usual AWS_* variables or files). Unset: "
        "the registry's Redis.")
    blob_endpoint_url: Optional[str] = Field(
        None, description="Endpoint of the S3-compatible store (MinIO, Ceph, R2...); unset, boto3's own "
        "(AWS_ENDPOINT_URL, else AWS).")
    cache_dir: Optional[str] = Field(
        None, description="Local disk cache of a worker or API host: accessories by content hash and datastore "
        "replicas. Shared by every flowpool process of the host; safe to delete while flowpool is stopped. "
        "Unset: flowpool-cache-<uid> in the system's temporary directory.")
    api_url: str = Field("http://127.0.0.1:8080", description="Where the command line finds the API; unset, that "
                         "of the `flowpool dev` running on FLOWPOOL_DATA_DIR, if one runs.")
    api_key: Optional[str] = Field(None, description="API key the command line sends; unset, that of the "
                                   "`flowpool dev` whose API it uses.")
    secret_key: Optional[str] = Field(
        None, description="Key for the keyed hash of request secrets in cache keys. When unset, one is "
        "generated once and kept in Redis; set it in production so it lives outside Redis.")
    data_dir: str = Field(
        ".flowpool", min_length=1,
        description="Where `flowpool dev` keeps what outlives a restart: its Redis data (AOF; unless "
        "FLOWPOOL_REDIS_URL is set) and its API key; and, while it runs, where it runs, which the other commands "
        "read (flowpool.devstate). A relative path is taken from the working directory.")

    # Time limits.
    default_timeout_seconds: float = Field(60, gt=0, description="Soft limit when the workflow sets none.")
    max_timeout_seconds: float = Field(600, gt=0, description="Operator cap on any workflow's soft limit.")
    hard_timeout_grace_seconds: float = Field(
        5, gt=0, description="Seconds between the soft limit (script interrupted) and the hard one (killed).")
    queue_wait_seconds: float = Field(
        60, gt=0, description="How long a run may wait for a free worker before the caller gets a 503.")
    redis_outage_seconds: float = Field(
        30, ge=0, description="How long past a run's deadline a Redis outage is ridden out: a worker keeps trying "
        "to write the run's outcome this long past its hard limit, a caller waits this long past the run's "
        "deadline before a 503 that names its request_id, and a run still unfinished this long (plus the worker "
        "TTL) past its deadline is marked lost (expired if it never started).")

    # Workers.
    worker_concurrency: int = Field(64, ge=1, description="Runs one worker holds at once.")
    worker_heartbeat_seconds: float = Field(1.0, gt=0, description="How often a worker says it is alive.")
    worker_ttl_seconds: float = Field(
        5.0, gt=0, description="A worker (and its runs) silent this long is taken for dead.")
    worker_drain_seconds: Optional[float] = Field(
        None, ge=0, description="On SIGTERM a worker takes no more runs and waits this long for the ones it runs; "
        "those still going are then killed and answer 500 worker_lost. Runs it had not started stay queued for "
        "other workers. Unset: the longest hard limit (FLOWPOOL_MAX_TIMEOUT_SECONDS plus "
        "FLOWPOOL_HARD_TIMEOUT_GRACE_SECONDS), so every run may finish.")
    worker_queues: str = Field(
        "default", description="Comma-separated queues a worker consumes (`flowpool worker --queues` wins): a "
        "workflow's runs go to the queue it names (QUEUE in its script, or the `queue` upload field), `default` "
        "when it names none.")
    autoscaled_queues: str = Field(
        "", description="Comma-separated queues whose workers an autoscaler starts from zero (KEDA): a run for one "
        "of them is queued while no worker serves it, and waits up to FLOWPOOL_QUEUE_WAIT_SECONDS for one to "
        "start. A run for any other queue that no live worker serves is answered 503 at once.")
    worker_events: bool = Field(False, description="Send Celery task events (for Flower).")
    script_cache_size: int = Field(256, ge=1, description="Compiled script versions kept warm per worker.")

    # Sizes.
    max_body_bytes: int = Field(8 << 20, description="Largest request body.")
    max_input_bytes: int = Field(2 << 20, description="Largest `input` plus `messages`, as JSON.")
    max_result_bytes: int = Field(2 << 20, description="Largest workflow result, as JSON.")
    max_result_bytes_cap: int = Field(16 << 20, description="Largest result a workflow's LIMITS may ask for.")
    max_log_bytes: int = Field(256 << 10, description="Log text kept per run; the rest is cut.")
    max_log_bytes_cap: int = Field(4 << 20, description="Most log text a workflow's LIMITS may ask for.")
    max_chunks: int = Field(10_000, description="Emitted chunks kept per run.")
    max_chunks_cap: int = Field(100_000, description="Most chunks a workflow's LIMITS may ask for.")
    max_chunk_bytes: int = Field(64 << 10, description="Largest emitted chunk, as JSON.")

    # Sandbox. Each per-run limit has a default and an operator cap: a workflow's LIMITS may ask for
    # more or less than the default, never more than the cap.
    sandbox_backend: str = Field(
        "auto", pattern="^(auto|bwrap|process)$",
        description="Isolation of runs: bwrap (namespaces, a minimal read-only root), process (fork, uid, rlimits, "
        "seccomp; weaker) or auto, the strongest that works on the host.")
    sandbox_memory_mb: int = Field(
        512, ge=64, description="Memory limit of a run: of each of its processes (address space), and of all of "
        "them together (a cgroup, or a watchdog; see FLOWPOOL_SANDBOX_CGROUPS).")
    sandbox_memory_mb_cap: int = Field(2048, ge=64, description="Most memory a workflow's LIMITS may ask for.")
    sandbox_cpu_seconds: Optional[int] = Field(
        None, ge=1, description="CPU seconds a run may use; unset: as long as its hard time limit.")
    sandbox_max_processes: int = Field(32, ge=1, description="Processes a run may have, all told.")
    sandbox_max_processes_cap: int = Field(256, ge=1, description="Most processes a workflow's LIMITS may ask for.")
    sandbox_max_open_files: int = Field(64, ge=16, description="Open files per run process.")
    sandbox_max_open_files_cap: int = Field(1024, ge=16, description="Most open files a workflow's LIMITS may ask for.")
    sandbox_max_file_mb: int = Field(64, ge=1, description="Largest file a run may write.")
    sandbox_tmp_mb: int = Field(64, ge=1, description="Size of a run's private /tmp (with per-run namespaces).")
    sandbox_tmp_mb_cap: int = Field(1024, ge=1, description="Largest /tmp a workflow's LIMITS may ask for.")
    sandbox_prestart: int = Field(
        2, ge=0, description="Run processes kept started and waiting for a job, so a run skips the fork.")
    sandbox_reuse: bool = Field(
        True, description="Keep a run process warm after its run, for the next run of the same workflow version of "
        "the same account on that worker (as Lambda reuses execution environments): it skips the fork and the "
        "sandbox's set-up. A process that ran a request carrying secrets, that failed to end cleanly or that left "
        "threads or processes behind is never reused; see docs/sandbox.md. Off: one fresh process per run.")
    sandbox_reuse_max_runs: int = Field(
        1000, ge=1, description="Runs one warm run process serves before it is retired for a fresh one.")
    sandbox_reuse_idle_seconds: float = Field(
        60, gt=0, description="How long a warm run process waits for its next run before it is retired.")
    sandbox_uid_base: int = Field(
        61000, description="When workers run as root, each run slot gets uid/gid base + slot.")
    sandbox_cgroups: str = Field(
        "auto", pattern="^(auto|off)$",
        description="Bounding a run's processes together: auto uses a cgroup per run slot where the host allows it "
        "(cgroup v2 delegated, or v1 writable as root), else a memory watchdog; off always uses the watchdog.")
    sandbox_packages: str = Field(
        "", description="Comma-separated distributions installed with the worker that scripts may import under "
        "bwrap (e.g. pydantic,PyYAML), staged with what they need at run time; empty: the standard library only. "
        "A name not installed stops the worker; flowpool may not be listed.")

    # Outbound calls made for runs (model providers, agents, ctx.http).
    egress_allow: str = Field(
        "", description="Comma-separated CIDRs or host names runs may reach although they are loopback, private, "
        "link-local or metadata addresses (e.g. a local vLLM: 127.0.0.1/32).")
    http_max_response_bytes: int = Field(5 << 20, ge=1024, description="Largest response body ctx.http reads.")
    max_call_depth: int = Field(5, ge=1, description="How deep workflows may call each other (ctx.workflows.call).")
    model_retries: int = Field(2, ge=0, description="Retries of a model call answered 429 or 5xx, per route.")
    model_connect_timeout_seconds: float = Field(5.0, gt=0, description="Connect timeout of a model call.")
    provider_keys: str = Field(
        "", description="Comma-separated names of the workers' environment variables that applications and agents "
        "may name as api_key_env, each as NAME or NAME@host (the key then goes only to a base_url on that host), "
        "e.g. OPENAI_API_KEY@api.openai.com. Empty: none; accounts bring keys as request secrets (api_key_secret). "
        "Anything else is refused at PUT and again at call time.")

    # Tenancy: each account's limits (the operator sets its own with `flowpool accounts limits`), fair share, usage.
    default_concurrency: int = Field(
        0, ge=0, description="Runs an account may have queued or running at once, unless the operator set its own; "
        "over it a request is answered 429 with Retry-After. 0: no limit.")
    default_rpm: int = Field(
        0, ge=0, description="Requests an account may make per minute (invocations and async runs; a burst of this "
        "many, then one every 60/N seconds), unless the operator set its own. 0: no limit.")
    default_tokens_per_day: int = Field(
        0, ge=0, description="Model-call tokens an account's runs may use per UTC day before new runs are answered "
        "429 (a run going when it crosses the budget finishes), unless the operator set its own. 0: no limit.")
    default_compute_seconds_per_day: int = Field(
        0, ge=0, description="Seconds its runs may hold worker slots per UTC day before new runs are answered 429, "
        "unless the operator set its own. 0: no limit.")
    fair_share: bool = Field(
        True, description="Order each worker queue so one account's backlog does not delay other accounts' runs: an "
        "account's runs beyond its share of the queue's slots wait in lower priority lanes (Redis broker).")
    usage_retention_days: int = Field(400, ge=1, description="How long each account's daily usage is kept.")
    webhook_retry_seconds: float = Field(
        3600, gt=0, description="How long a run's webhook is retried, with backoff, counted from its first attempt.")
    webhook_timeout_seconds: float = Field(10, gt=0, description="How long one webhook delivery may take.")
    run_wait_max_seconds: float = Field(
        60, gt=0, description="Longest long poll GET /api/v1/runs/{id}?wait=N holds a request open.")

    # Cache and records.
    default_cache_ttl_seconds: int = Field(3600, ge=0, description="Result cache TTL when the workflow sets none.")
    run_ttl_seconds: int = Field(7 * 86400, ge=60, description="How long run records are kept.")
    runs_per_workflow: int = Field(1000, ge=1, description="Run ids indexed per workflow.")
    runs_per_account: int = Field(
        10000, ge=1, description="Run ids indexed per account (GET /api/v1/runs, the console's runs page); the oldest "
        "drop out of the list, though their records stay for FLOWPOOL_RUN_TTL_SECONDS.")
    run_record_input_bytes: int = Field(
        64 << 10, ge=0, le=16 << 20,
        description="Largest `input` (and, apart, `messages`), as compact JSON, a run's record keeps to show what the "
        "caller sent (secrets redacted); a larger one is kept as a note of its size.")
    idempotency_seconds: int = Field(
        86400, ge=1, description="How long an Idempotency-Key is remembered per account: a request repeating it "
        "within this window gets the first request's run (same request_id, output and status), never a second run. "
        "At most FLOWPOOL_RUN_TTL_SECONDS, since the answer is read from the first run's record.")

    # Serving.
    stream_keepalive_seconds: float = Field(15.0, gt=0, description="A comment line every so often on an idle stream.")
    api_worker_class: str = Field(
        "gevent", pattern="^(gevent|gthread)$",
        description="gunicorn worker class. gevent: an open stream costs a greenlet, so thousands of streams "
        "never starve other requests; gthread: a thread per open request.")
    api_connections: int = Field(1000, ge=1, description="Open connections per API process (gevent).")
    api_threads: int = Field(32, ge=1, description="Threads per API process (gthread).")
    api_workers: int = Field(2, ge=1, description="API processes (gunicorn workers).")
    log_level: str = Field("INFO", description="Log level of every process.")
    admin_token: Optional[str] = Field(
        None, min_length=16,
        description="Operator routes (GET /api/v1/pool and the admin routes) answer only requests carrying "
        "`Authorization: Bearer <token>` (401 otherwise). Unset, they answer only requests from loopback, so "
        "`flowpool dev` needs none; set it wherever the API is behind a proxy or on a network.")
    metrics_token: Optional[str] = Field(
        None, min_length=1,
        description="When set, GET /metrics answers only requests carrying `Authorization: Bearer <token>` "
        "(401 otherwise); unset, /metrics is public, so keep it off networks you do not trust.")
    console_enabled: bool = Field(
        True, description="Serve the web console at /console (signed in with an API key); false: /console is a 404.")
    console_session_seconds: int = Field(
        8 * 3600, ge=300, le=30 * 86400,
        description="How long a console sign-in lasts without a request: each request (at most once a minute) "
        "starts the span again; signing out, or the API key being deleted, ends it at once.")
    console_secure_cookie: str = Field(
        "auto", pattern="^(auto|always|never)$",
        description="The console cookie's Secure flag: auto, when the request came over https (a proxy ending TLS "
        "in front of the API makes every request look like http: set always there); always; never.")

    # Malformed requests: each bound answers a 4xx at once instead of a 5xx or a hang.
    max_json_depth: int = Field(
        DEFAULT_MAX_JSON_DEPTH, ge=2, le=500,
        description="Deepest nesting of arrays and objects in a request body or a workflow result; deeper is a 400 "
        "(a result: the run fails with invalid_result).")
    max_script_bytes: int = Field(
        DEFAULT_MAX_SCRIPT_BYTES, ge=1024, description="Largest workflow script, as UTF-8, that upload and validate "
        "accept.")
    accessory_max_mb: float = Field(
        50, gt=0, description="Largest accessory a workflow version may bundle, in MB (MiB): a bigger one is a 413 "
        "naming its key.")
    accessories_max: int = Field(100, ge=0, description="Most accessories one workflow version may bundle (more is "
                                 "a 400).")
    accessory_memory_mb: float = Field(
        512, gt=0, description="Memory, in MB (MiB), each worker process gives its sealed in-memory copies of "
        "accessories (one per distinct accessory, shared memory), least recently used let go first; a copy let go "
        "of is read again from the host's disk cache when next loaded.")
    max_upload_mb: float = Field(
        256, gt=0, description="Largest body of a workflow upload (POST /api/v1/workflows/upload and "
        "POST /api/v1/workflows) or preview (POST /api/v1/workflows/preview), in MB, multipart or JSON (base64 makes "
        "an accessory a third bigger); every other route keeps FLOWPOOL_MAX_BODY_BYTES. The API holds such a body in "
        "memory while it stores it.")
    max_ingest_mb: float = Field(
        64, gt=0, description="Largest body of a datastore ingest (POST /api/v1/datastores/{name}/records), in MB; "
        "every other route keeps FLOWPOOL_MAX_BODY_BYTES. `flowpool datastore ingest` sends batches under it.")
    datastore_batch_max_records: int = Field(
        10_000, ge=1, description="Most records one datastore ingest request may carry (more is a 400); "
        "`flowpool datastore ingest` splits a file into batches under it.")
    datastore_record_max_bytes: int = Field(
        1 << 20, ge=256, description="Largest datastore record, as JSON without its vector (bigger is a 400 "
        "naming it).")
    datastore_hybrid_candidates: int = Field(
        100, ge=1, description="Results taken from each of the keyword and the vector ranking before a hybrid "
        "search fuses them (reciprocal rank fusion); at least the search's limit.")
    datastore_snapshot_batches: int = Field(
        64, ge=1, description="A datastore replica is snapshotted into the blob store every this many batches, so "
        "a new host downloads the snapshot and replays only the batches after it.")
    datastore_apply_wait_seconds: float = Field(
        120, gt=0, description="How long a reader waits for another process of its host to finish bringing a "
        "datastore replica up to date before it answers 503.")
    body_timeout_seconds: float = Field(
        5.0, gt=0, description="Seconds a request body may go without a byte arriving; a stalled one (e.g. fewer "
        "bytes than its Content-Length) is answered 408 and its connection closed.")

    @field_validator("worker_queues", "autoscaled_queues")
    @classmethod
    def _queue_names(cls, value: str) -> str:
        for name in split_list(value):
            check_queue_name(name)
        return value

    @property
    def redis(self) -> str:
        """The Redis URL in force."""
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def broker(self) -> str:
        """The broker URL in force."""
        return self.broker_url or self.redis

    @property
    def cache_path(self) -> str:
        """The local disk cache in force (FLOWPOOL_CACHE_DIR, or one per user in the temporary directory)."""
        if self.cache_dir:
            return os.path.abspath(self.cache_dir)
        return os.path.join(tempfile.gettempdir(), f"flowpool-cache-{os.getuid()}")

    @property
    def worker_queue_names(self) -> list[str]:
        """The queues a worker consumes (FLOWPOOL_WORKER_QUEUES), in order, each once."""
        return list(dict.fromkeys(split_list(self.worker_queues)))

    @property
    def autoscaled_queue_names(self) -> set[str]:
        """The queues an autoscaler serves from zero workers (FLOWPOOL_AUTOSCALED_QUEUES)."""
        return set(split_list(self.autoscaled_queues))

    @property
    def worker_drain(self) -> float:
        """Seconds a stopping worker waits for its runs (FLOWPOOL_WORKER_DRAIN_SECONDS, or the longest hard limit)."""
        if self.worker_drain_seconds is not None:
            return self.worker_drain_seconds
        return self.max_timeout_seconds + self.hard_timeout_grace_seconds

    def clamp_timeout(self, seconds: float | None) -> float:
        """The soft limit of a run: the workflow's own, or the default, never over the operator cap."""
        return min(seconds or self.default_timeout_seconds, self.max_timeout_seconds)

    def run_limits(self, asked: dict[str, int] | None = None) -> dict[str, int | None]:
        """The limits of one run, by LIMITS key: the workflow's own where it asked, else the default; never over the cap."""
        asked = asked or {}
        limits: dict[str, int | None] = {}
        for key, (default_field, cap_field) in WORKFLOW_LIMITS.items():
            value = asked.get(key, getattr(self, default_field))
            cap = getattr(self, cap_field) if cap_field else None
            limits[key] = value if value is None or cap is None else min(value, cap)
        return limits

    @property
    def idempotency_window(self) -> int:
        """Seconds an Idempotency-Key names its run, and the sealed clear output of a run carrying its request's
        secrets is kept for its callers (a repeat reads it): the setting, within the life of run records."""
        return min(self.idempotency_seconds, self.run_ttl_seconds)

    @property
    def run_deadline_slack(self) -> float:
        """Seconds the API waits past a run's hard limit before calling the worker lost."""
        return self.hard_timeout_grace_seconds + self.worker_ttl_seconds

    @property
    def run_reap_margin(self) -> float:
        """Seconds past its deadline an unfinished run is ended by the reaper: once its worker stopped trying
        to write the outcome (FLOWPOOL_REDIS_OUTAGE_SECONDS) and the worker's lease on it lapsed."""
        return self.redis_outage_seconds + self.worker_ttl_seconds
