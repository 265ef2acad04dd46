"""``flowpool doctor``: what is configured and reachable, and what would go wrong."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import click

from ..devstate import shown_url
from .common import CliSettings, load_cli_settings, server_extra

__all__ = ["COMMANDS"]


def _at_least(version: str, wanted: tuple[int, ...]) -> bool:
    """Whether a dotted version string is ``wanted`` or later (a part that is not a number counts as 0)."""
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:len(wanted)])
    return parts >= wanted


def _redis_durability(client: Any) -> tuple[str, str | None, list[str]]:
    """How a Redis keeps its data, and what in that would lose flowpool's registry and runs (docs/operations.md).

    Returns a description, why the data is not safe there (an evicting
    ``maxmemory-policy``: a full Redis drops accounts and queued runs; the
    fix included), else None, and the warnings: no persistence (neither AOF
    nor RDB save points; the test and benchmark Redis servers keep nothing),
    or what could not be checked. Managed Redis often disables or renames
    CONFIG; INFO then still says whether AOF is on and which policy is in
    force, but not whether RDB save points are set.
    """
    import redis

    lost = "a restart loses every account, key, workflow and run"
    save: str | None  # the RDB save points; None: unknown
    try:
        config = {name: client.config_get(name).get(name, "")
                  for name in ("appendonly", "appendfsync", "save", "maxmemory-policy")}
        aof, save, policy = config["appendonly"] == "yes", config["save"], config["maxmemory-policy"] or None
        how_aof = f"AOF (appendfsync {config['appendfsync']})"
    except redis.ResponseError:
        try:
            info = {**client.info("persistence"), **client.info("memory")}
        except redis.ResponseError:
            return "not checked", None, [
                "could not check persistence or maxmemory-policy: neither CONFIG nor INFO is available; "
                "flowpool needs AOF or RDB snapshots and noeviction (see docs/operations.md)"]
        aof, save, policy, how_aof = info.get("aof_enabled") == 1, None, info.get("maxmemory_policy"), "AOF"
    warnings = []
    if aof:
        kept = how_aof
    elif save:
        kept = f"RDB snapshots (save {save}): a crash loses what was written since the last one"
    elif save is None:
        kept = "AOF off, RDB unknown"
        warnings.append(f"could not check persistence: CONFIG is not available and AOF is off; unless RDB snapshots "
                        f"are on, {lost} (see docs/operations.md)")
    else:
        kept = "nothing"
        warnings.append(f"no persistence (appendonly no, no RDB save points): {lost}; turn on AOF "
                        "(appendonly yes, appendfsync everysec; see docs/operations.md)")
    evicts = None
    if policy is None:
        warnings.append("could not check maxmemory-policy: flowpool needs noeviction (see docs/operations.md)")
    elif policy != "noeviction":
        evicts = ("a full Redis evicts accounts, keys, workflows and queued runs; set maxmemory-policy noeviction "
                  "(see docs/operations.md)")
    return f"{kept}; maxmemory-policy {policy or 'unknown'}", evicts, warnings


def _reason(exc: Exception) -> str:
    """Why a request got no answer, short: the OS error (``[Errno 111] Connection refused``), else its kind."""
    import requests

    found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
    if found:
        return found.group(0)
    return "timed out" if isinstance(exc, requests.Timeout) else type(exc).__name__


def _cache_dir(path: str) -> tuple[str, bool]:
    """The host's disk cache (accessories, datastore replicas): ours alone, or absent and makeable."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        return (f"{path} (made on first use)", True) if os.access(parent, os.W_OK) else \
            (f"{path}: does not exist and {parent} is not writable; set FLOWPOOL_CACHE_DIR", False)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return (f"{path}: owned by uid {info.st_uid} with mode {oct(info.st_mode & 0o777)}; workers refuse a cache "
                "others may write in: remove it, or set FLOWPOOL_CACHE_DIR", False)
    return path, True


def _api_checks(loaded: CliSettings) -> list[tuple[str, str, bool]]:
    """The ``api`` and ``api key`` lines: the API answers /readyz, and accepts the key in one authenticated call."""
    import requests

    settings = loaded.settings
    base = settings.api_url.rstrip("/")
    origin = loaded.origin("api_url")
    where = f"{shown_url(base)} (from {origin})" if origin else f"{shown_url(base)} (the default)"
    not_checked = ("api key", "not checked: the API did not answer", False)
    try:
        ready = requests.get(base + "/readyz", timeout=5)
    except requests.RequestException as exc:
        return [("api", f"{where}: no answer ({_reason(exc)}); start it with `flowpool dev`, or set "
                 "FLOWPOOL_API_URL to where it runs", False), not_checked]
    try:
        checks = ready.json()["checks"]
        workers = int(checks["workers"])
    except (ValueError, KeyError, TypeError):
        return [("api", f"{where}: /readyz answered {ready.status_code}, not as flowpool's API does; set "
                 "FLOWPOOL_API_URL to where flowpool's API runs", False), not_checked]
    if ready.status_code == 200:
        lines = [("api", f"{where}: ready, {workers} worker{'' if workers == 1 else 's'}", True)]
    elif checks.get("redis") != "ok":
        lines = [("api", f"{where}: not ready, its Redis: {checks.get('redis')}; start that Redis (the API's "
                  "FLOWPOOL_REDIS_URL)", False)]
    else:
        lines = [("api", f"{where}: not ready, no worker answering; start one with `flowpool worker`, on the "
                  "API's Redis", False)]
    if not settings.api_key:
        return lines + [("api key", "not set: run this where `flowpool dev` runs (it finds that dev's key), or set "
                         "FLOWPOOL_API_KEY (`flowpool accounts create NAME` prints one)", False)]
    key_origin = loaded.origin("api_key")
    try:
        listed = requests.get(base + "/api/v1/workflows", params={"limit": 1}, timeout=10,
                              headers={"x-api-key": settings.api_key})
    except requests.RequestException as exc:
        return lines + [("api key", f"not checked: GET /api/v1/workflows got no answer ({_reason(exc)})", False)]
    if listed.status_code == 200:
        return lines + [("api key", f"accepted (from {key_origin})", True)]
    if listed.status_code == 401:
        return lines + [("api key", f"rejected: the API answers 401 to the key from {key_origin}; use the key "
                         "`flowpool dev` printed, or one `flowpool accounts create NAME` made on the API's Redis",
                         False)]
    return lines + [("api key", f"not checked: GET /api/v1/workflows answered {listed.status_code}: "
                     f"{listed.text[:200]}", False)]


@click.command()
def doctor() -> None:
    """Check what the commands and a worker here would use: the API and its key, Redis, workers, the sandbox.

    The API, the key and Redis are those of the FLOWPOOL_* variables, else of the `flowpool dev` running
    on FLOWPOOL_DATA_DIR (default .flowpool here). Each check prints an ok or BAD line (a BAD one says the
    fix), warnings go to stderr, and doctor exits 1 when a check failed.
    """
    with server_extra("doctor"):
        import redis

        from .. import keys
        from ..blobs import open_blob_store
        from ..connections import connect_redis
        from ..redis_server import find_redis_server
        from ..sandbox import Sandbox, SandboxLimits

    loaded = load_cli_settings()
    settings = loaded.settings
    ok = True

    def line(name: str, value: str, good: bool = True) -> None:
        nonlocal ok
        ok = ok and good
        click.echo(f"{'ok ' if good else 'BAD'} {name:<16} {value}")

    def warn(name: str, value: str) -> None:
        # On stderr: stdout holds only the ok/BAD lines that scripts read. A warning does not fail doctor.
        click.echo(f"WRN {name:<16} {value}", err=True)

    where, warning = loaded.redis_source()
    line("redis", where)
    if warning:
        warn("redis", warning)
    try:
        client = connect_redis(settings)  # commands time out: a paused Redis cannot hang doctor
        client.ping()
        line("redis reachable", "yes")
        version = str(client.info("server").get("redis_version", "0"))
        line("redis version", version if _at_least(version, (6, 2)) else
             f"{version}: flowpool needs Redis 6.2 or later (admission's script uses ZADD GT)",
             _at_least(version, (6, 2)))
        kept, evicts, warnings = _redis_durability(client)
        line("redis data", f"{kept}: {evicts}" if evicts else kept, evicts is None)
        for warning_text in warnings:
            warn("redis data", warning_text)
        now = time.time()
        workers = client.zrangebyscore(keys.WORKERS, now - settings.worker_ttl_seconds, "+inf")
        line("workers", ", ".join(w.decode() for w in workers) or
             "none answering: start one with `flowpool worker` on this Redis, or run `flowpool dev`", bool(workers))
        described = client.hmget(keys.WORKER_SANDBOXES, workers) if workers else []
        for worker_name, info in zip(workers, described):
            sandbox_info = json.loads(info) if info else {}
            line("worker sandbox", f"{worker_name.decode()}: {sandbox_info.get('backend', 'unknown')}; "
                 f"{sandbox_info.get('isolation', 'not published')}", bool(info) and not sandbox_info.get("weaknesses"))
            line("worker limits", f"{worker_name.decode()}: {sandbox_info.get('run_limits', 'not published')}",
                 "WARNING" not in sandbox_info.get("run_limits", "WARNING"))
    except redis.RedisError as exc:
        line("redis reachable", f"no: {str(exc).rstrip('.')}; start it, or set FLOWPOOL_REDIS_URL, or run this where "
             "`flowpool dev` runs", False)
    line("broker", shown_url(settings.broker))
    try:
        blobs = open_blob_store(settings, connect_redis(settings))
        blobs.check()
        line("blob store", blobs.location + ("" if settings.blob_url else " (FLOWPOOL_BLOB_URL unset)"))
    except Exception as exc:  # a store that cannot be opened or reached, whatever the backend says
        line("blob store", f"{settings.blob_url or 'the registry Redis'}: {exc}", False)
    line("cache dir", *_cache_dir(settings.cache_path))
    line("secret key", "FLOWPOOL_SECRET_KEY" if settings.secret_key else
         "generated and kept in Redis, beside what it seals: set FLOWPOOL_SECRET_KEY in production")
    line("provider keys", settings.provider_keys or "none: accounts pass keys as request secrets")
    line("metrics", "bearer token required" if settings.metrics_token else "public (FLOWPOOL_METRICS_TOKEN unset)")
    try:
        line("redis-server", find_redis_server())
    except Exception as exc:
        line("redis-server", str(exc), settings.redis_url is not None)
    sandbox = None
    try:
        sandbox = Sandbox(SandboxLimits(), slots=1, uid_base=settings.sandbox_uid_base, prestart=0,
                          backend=settings.sandbox_backend, cgroups=settings.sandbox_cgroups,
                          packages=settings.sandbox_packages)
        sandbox.start()
        # What a worker started here, with these settings, would get.
        line("sandbox backend", sandbox.backend + ("" if settings.sandbox_backend == "bwrap" else
                                                   f" ({settings.sandbox_backend}: {sandbox.backend_note})"))
        line("sandbox", sandbox.describe(), not sandbox.weaknesses)
        line("run limits", sandbox.run_limits, "WARNING" not in sandbox.run_limits)
    except Exception as exc:
        line("sandbox", f"the sandbox did not start: {exc}", False)
    finally:
        if sandbox is not None:
            sandbox.stop()
    for name, value, good in _api_checks(loaded):
        line(name, value, good)
    sys.exit(0 if ok else 1)



COMMANDS = [doctor]
