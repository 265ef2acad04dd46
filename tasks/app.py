"""The Celery app: broker settings chosen for long, non-idempotent runs, and the names of the queue and task.

This is all an API process needs to send a run: it sends the task by name
and never imports the worker side (:mod:`.run_task` registers the task).
"""
from __future__ import annotations

from celery import Celery

from flowpool.settings import Settings

__all__ = ["create_celery", "RUN_TASK", "QUEUE"]

RUN_TASK = "flowpool.run"
QUEUE = "flowpool"


def create_celery(settings: Settings) -> Celery:
    """The Celery app as API processes use it: configured to send runs, with no task of its own."""
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
    return app
