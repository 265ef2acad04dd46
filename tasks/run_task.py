"""What only workers load: the ``flowpool.run`` task around :func:`execute_run`, and the bootstep
that starts and stops the worker's runtime (sandbox, heartbeat) with the Celery worker."""
from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery, bootsteps
from celery.worker import state

from flowpool.run import RunJob
from flowpool.settings import Settings

from .app import RUN_TASK, create_celery
from .execute import execute_run
from .worker import WorkerRuntime

__all__ = ["worker_celery"]


def worker_celery(settings: Settings) -> Celery:
    """The Celery app of a worker: the sending app, plus the run task and the runtime bootstep."""
    app = create_celery(settings)
    app.flowpool_settings = settings
    app.flowpool_runtime = None
    app.flowpool_ready = threading.Event()

    # Not shared: a shared task would be added to every Celery app made after this one in the process.
    @app.task(name=RUN_TASK, bind=True, ignore_result=True, shared=False)
    def run_workflow(self: Any, job: dict[str, Any]) -> str:
        if not self.app.flowpool_ready.wait(60):
            raise RuntimeError("the flowpool worker runtime did not start")
        return execute_run(self.app.flowpool_runtime, RunJob.from_message(job))

    app.steps["worker"].add(_RuntimeStep)
    return app


class _RuntimeStep(bootsteps.StartStopStep):
    """Starts the sandbox and the heartbeat with the worker, and stops them with it."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        app = worker.app
        runtime = WorkerRuntime(app.flowpool_settings, name=worker.hostname)
        runtime.start()
        app.flowpool_runtime = runtime
        app.flowpool_ready.set()

    def stop(self, worker: Any) -> None:
        runtime = worker.app.flowpool_runtime
        if runtime is None:
            return
        # This step stops before the pool does: on a warm shutdown (SIGTERM)
        # the consumer takes no more messages, and the runs still going get
        # up to their hard limit to finish before the sandbox goes away.
        settings = worker.app.flowpool_settings
        deadline = time.monotonic() + settings.max_timeout_seconds + settings.hard_timeout_grace_seconds
        while state.active_requests and time.monotonic() < deadline and not state.should_terminate:
            time.sleep(0.05)
        worker.app.flowpool_ready.clear()
        runtime.stop()
        worker.app.flowpool_runtime = None
