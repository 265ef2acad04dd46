"""``flowpool dev``, ``flowpool api`` and ``flowpool worker``: the commands that run the server."""
from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Any

import click

from ..procs import set_not_dumpable, url_host
from ..queues import broker_queue, check_queue_name
from ..settings import split_list
from .common import load_settings, server_extra

__all__ = ["COMMANDS"]


@click.command()
@click.option("--port", default=8080, show_default=True, help="API port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="API address.")
@click.option("--flower", is_flag=True,
              help="Also run Celery Flower (needs the flower extra), with a password shown in the banner.")
@click.option("--flower-port", default=5555, show_default=True, help="Flower's port, with --flower.")
@click.option("--reset", is_flag=True,
              help="First wipe what dev keeps in FLOWPOOL_DATA_DIR: its Redis data and API key.")
def dev(port: int, host: str, flower: bool, flower_port: int, reset: bool) -> None:
    """Everything on one machine: Redis (unless FLOWPOOL_REDIS_URL is set), a worker and the API.

    Its Redis data and its API key are kept in FLOWPOOL_DATA_DIR (default .flowpool in the working
    directory), so a restart brings back the same key and every workflow. While it runs, the other
    commands run there (or with the same FLOWPOOL_DATA_DIR) find its API, key and Redis by themselves.
    Ctrl-C, SIGINT or SIGTERM stop it and everything it started.
    """
    with server_extra("dev"):
        from ..devstack import DevStack

    # The processes that serve take every setting from their environment: only the client commands look
    # for a running dev (load_cli_settings).
    stack = DevStack(load_settings(discover=False), host=host, port=port, flower=flower, reset=reset,
                     flower_port=flower_port)
    stack.run()


def _gunicorn_post_fork(server: Any, worker: Any) -> None:
    """A gunicorn worker dies with its arbiter, even one killed outright (it would be left behind)."""
    from ..procs import set_parent_death_signal

    set_parent_death_signal()


def _gunicorn_post_worker_init(worker: Any) -> None:
    """Answer gunicorn's own errors as JSON; quit at once on SIGINT and SIGQUIT (Ctrl-C, or a quick shutdown)."""
    from ..api.serving import use_json_error_pages

    use_json_error_pages()
    # gunicorn's gthread handler for these shuts the worker's thread pool down
    # under the pool's lock, which is not re-entrant: a signal landing while
    # the main thread holds it (submitting a request, or inside the handler
    # for the other signal, as Ctrl-C sends SIGINT and the arbiter SIGQUIT)
    # deadlocks the worker for good (CPython issue #121649).
    signal.signal(signal.SIGINT, _quit_now)
    signal.signal(signal.SIGQUIT, _quit_now)
    # The app is loaded by now: what it holds lives as long as the worker, so the collector stops scanning it
    # (full collections of it were about 3% of the API's CPU per run).
    gc.collect()
    gc.freeze()


def _quit_now(signum: int, frame: Any) -> None:
    os._exit(0)


@click.command()
@click.option("--port", default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default; a container or a host serving others passes --host 0.0.0.0.")
def api(port: int, host: str) -> None:
    """Serve the API with gunicorn (FLOWPOOL_API_WORKERS processes of FLOWPOOL_API_WORKER_CLASS)."""
    with server_extra("api"):
        from gunicorn.app.base import BaseApplication

    settings = load_settings(discover=False)
    set_not_dumpable()

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            config = {
                "bind": f"{url_host(host)}:{port}", "workers": settings.api_workers,
                "worker_class": settings.api_worker_class, "timeout": int(settings.max_timeout_seconds + 120),
                "graceful_timeout": 30, "keepalive": 5, "accesslog": None, "loglevel": settings.log_level.lower(),
                "post_fork": _gunicorn_post_fork, "post_worker_init": _gunicorn_post_worker_init,
            }
            if settings.api_worker_class == "gthread":
                config["threads"] = settings.api_threads
            else:
                config["worker_connections"] = settings.api_connections
            if "control_socket_disable" in self.cfg.settings:
                # gunicorn 27's control socket lives at one path per user (~/.gunicorn/gunicorn.ctl): every API
                # started on a host would take it from the previous one, and it outlives the process. flowpool
                # has no use for it (signals stop and scale the arbiter).
                config["control_socket_disable"] = True
            for key, value in config.items():
                self.cfg.set(key, value)

        def load(self):  # type: ignore[no-untyped-def]
            # Imported here, in the worker: with gevent the worker patches the
            # standard library first, and the app's modules must come after.
            from ..api import create_app

            return create_app(settings)

    _Server().run()



@click.command()
@click.option("--concurrency", type=int, default=None, help="Runs held at once (default FLOWPOOL_WORKER_CONCURRENCY).")
@click.option("--name", default=None, help="Worker node name (default flowpool@<host>-<pid>).")
@click.option("--queues", "-Q", default=None, metavar="NAMES",
              help="Comma-separated worker queues to consume, e.g. heavy,default (default FLOWPOOL_WORKER_QUEUES).")
def worker(concurrency: int | None, name: str | None, queues: str | None) -> None:
    """Run a Celery worker that executes workflows in the sandbox.

    It takes runs from the worker queues it is given: a workflow's runs go
    to the queue it names (QUEUE, or the `queue` upload field), `default`
    when it names none. SIGTERM stops it gracefully: it takes no more runs
    and waits up to FLOWPOOL_WORKER_DRAIN_SECONDS for those it runs.
    """
    import socket

    with server_extra("worker"):
        from ..tasks import worker_celery

    settings = load_settings(discover=False)
    names = settings.worker_queue_names
    if queues is not None:
        try:
            names = [check_queue_name(q) for q in dict.fromkeys(split_list(queues))]
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--queues") from None
        if not names:
            raise click.BadParameter("name at least one queue", param_hint="--queues")
    set_not_dumpable()
    app = worker_celery(settings)
    # What `celery worker` does, but keeping the exit code (app.worker_main drops it): a worker that could not
    # start (its sandbox, a setting) exits non-zero, so a supervisor or an orchestrator sees it fail.
    # The thread pool: each run is a sandboxed process the thread supervises
    # (time limits included), so a thread costs little while a run waits on I/O.
    worker = app.Worker(
        hostname=name or f"flowpool@{socket.gethostname()}-{os.getpid()}", pool_cls="threads",
        concurrency=concurrency or settings.worker_concurrency, loglevel=settings.log_level,
        queues=[broker_queue(q) for q in names],
        without_gossip=True, without_mingle=True, task_events=settings.worker_events)
    worker.start()
    sys.exit(worker.exitcode or 0)



COMMANDS = [dev, api, worker]
