"""The Celery app: broker settings chosen for long, non-idempotent runs, and the names of the queue and task.

This is all an API process needs to send a run: it sends the task by name
and never imports the worker side (:mod:`.run_task` registers the task).
"""
from __future__ import annotations

from celery import Celery
from kombu import Connection

from flowpool.queues import BROKER_QUEUE
from flowpool.settings import Settings

__all__ = ["create_celery", "RUN_TASK", "QUEUE"]

RUN_TASK = "flowpool.run"
QUEUE = BROKER_QUEUE  # the default queue's; flowpool.queues names the others

# Seconds after its fetch a message no worker started goes back to the queue (see create_celery).
VISIBILITY_SECONDS = 5


def create_celery(settings: Settings) -> Celery:
    """The Celery app as API processes use it: configured to send runs, with no task of its own."""
    app = Celery("flowpool", broker=settings.broker, set_as_current=False)
    redis_broker = Connection(settings.broker).transport.driver_type == "redis"
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
        # the run's lease (see flowpool.runs).
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        # A worker fetches a run only when it has a free slot, so it never holds
        # one it has not started: acked messages no longer count against the
        # prefetch, so without this a busy worker would hold up to a slot's
        # worth more, out of reach of idle workers, and lose them if killed.
        # Celery applies it to Redis brokers only; with amqp it is ignored and
        # the multiplier of 1 bounds what a worker holds to one run per slot,
        # which the broker hands back at once when the worker's connection drops.
        worker_disable_prefetch=redis_broker,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # With acks at the start and no prefetch, a message sits in the
            # transport's `unacked` hash (with the request's sealed secrets)
            # only between its fetch and the run's start: milliseconds. Only
            # a worker that died in that gap leaves it there, and the sweep
            # every worker makes each second puts it back in the queue
            # VISIBILITY_SECONDS after the fetch. A live worker slower than that
            # (Redis paused under its ack) gets its message delivered a second
            # time, which is harmless: the run's claim (flowpool.runs) lets one
            # delivery run it, and the other is acked as it starts and skipped.
            # A run in progress is never redelivered: its message left
            # `unacked` when it started.
            "visibility_timeout": VISIBILITY_SECONDS,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,  # scan on every sweep, not every tenth
            # The lock one sweep holds: a worker killed holding it must not stop
            # every sweep for long. Two sweeps at once are harmless: each
            # restore is a transaction that takes a message out of `unacked`.
            "unacked_mutex_expire": VISIBILITY_SECONDS,
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
