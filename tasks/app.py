"""The Celery app: broker settings chosen for long, non-idempotent runs, and the one task."""
from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery, bootsteps
from celery.worker import state

from flowpool.settings import Settings

from .execute import execute_run

__all__ = ["create_celery", "RUN_TASK", "QUEUE"]

RUN_TASK = "flowpool.run"
QUEUE = "flowpool"


def create_celery(settings: Settings) -> Celery:
    """The Celery app for API processes (which only send) and workers (which also run)."""
    app = Celery("flowpool", broker=settings.broker, set_as_current=False)
    longest_run = settings.max_timeout_seconds + settings.hard_timeout_grace_seconds
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        task_ignore_result=True,
        result_backend=None,
        # A run makes paid model calls and streams output to its caller: it is
        # not idempotent. So the message is acknowledged when the run starts
        # (acks_late off): a worker killed mid-run loses that run instead of
        # running it twice, and the caller learns of it within seconds through
        # the run's lease (see flowpool.runs). With acks_late on, the Redis
        # transport would also redeliver any run longer than the visibility
        # timeout to a second worker while the first still runs it (Celery
        # issues #5935, #7651).
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        # Prefetch no more than the free slots: a reserved message waits in a
        # worker's memory, where no other worker can take it.
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # Covers only messages reserved but not started when their worker
            # died; the run's `expires` has passed long before it comes back.
            "visibility_timeout": int(settings.queue_wait_seconds + longest_run) + 60,
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        # A broker that is down must become a fast 503, not a hang.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        worker_send_task_events=settings.worker_events,
        task_send_sent_event=settings.worker_events,
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
    )
    app.flowpool_settings = settings
    app.flowpool_runtime = None
    app.flowpool_ready = threading.Event()

    @app.task(name=RUN_TASK, bind=True, ignore_result=True)
    def run_workflow(self: Any, job: dict[str, Any]) -> str:
        if not self.app.flowpool_ready.wait(60):
            raise RuntimeError("the flowpool worker runtime did not start")
        return execute_run(self.app.flowpool_runtime, job)

    app.steps["worker"].add(_RuntimeStep)
    return app


class _RuntimeStep(bootsteps.StartStopStep):
    """Starts the sandbox and the heartbeat with the worker, and stops them with it."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        from .worker import WorkerRuntime

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
